"""The official-layout PyTorch models (tests and benches only; needs torch)."""

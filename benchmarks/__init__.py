"""Benchmarks and the PyTorch reference of ms-dfkd (never imported by ms_dfkd/ or kernels/)."""

"""Measured win table of ``impl="auto"`` (written by ``dispatch.write_win_table`` from ``bench_multi_lora --json``).

Empty: no GPU measurement exists yet, so ``auto`` never takes the fused path (it uses cuBLAS + the side
kernels on CUDA). The GPU issue for the kernel fills it."""
WIN_TABLE = []

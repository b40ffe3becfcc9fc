"""Benchmark and sweep scripts (not installed with fxfuse): ``python -m benchmarks.zoo`` (torchvision zoo sweep →
docs/zoo.md), ``python -m benchmarks.zoo_timm`` (timm zoo sweep → docs/zoo-timm.md), ``benchmarks/article_timer.py``,
``benchmarks/horizontal.py``. Run from the repository root."""

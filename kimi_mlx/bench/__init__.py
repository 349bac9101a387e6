"""Benchmarks: `python -m kimi_mlx.bench {kda,model,roofline} [options]` (each has --help)."""

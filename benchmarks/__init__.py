"""Benchmarks: `engine bench` (throughput and memory across backends, with HF Trainer and hand-loop
baselines run the same way). Installed with the engine, so `engine bench` works from any install.

runner.py    the matrix: one subprocess per combination, outcome ok/oom/error, one JSON per run
baselines.py the HF Trainer and plain-PyTorch reference loops (started with torchrun)
report.py    Markdown table + PNG chart + estimate-vs-measured from the result JSONs

The model table and FLOPs (engine/flops.py) and the memory estimator behind `engine estimate`
(engine/estimate.py) belong to the engine; results/ holds measurements, not code.
"""

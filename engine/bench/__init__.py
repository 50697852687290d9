"""Benchmarks: `engine bench` (throughput and memory across backends, with HF Trainer and hand-loop
baselines run the same way) and `engine estimate` (predicted memory per rank).

runner.py    the matrix: one subprocess per combination, outcome ok/oom/error, one JSON per run
baselines.py the HF Trainer and plain-PyTorch reference loops (started with torchrun)
report.py    Markdown table + PNG chart + estimate-vs-measured from the result JSONs
flops.py     named architectures, parameter counts, model FLOPs per token, device peaks
estimate.py  memory per rank for each backend/stage/offload (DeepSpeed's estimators where they apply)
"""

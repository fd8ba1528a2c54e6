"""The Ray wiring: the jobs behind the entry scripts in pipelines/ and the console scripts.

    convert   registry -> sharded WebDataset tars (Ray Data)       xsam-convert / pipelines/convert.py
    train     one training stage (Ray Train + DeepSpeed)           xsam-train   / pipelines/train.py
    evaluate  checkpoints x benchmarks, registry, alias (Ray)      xsam-evaluate / pipelines/evaluate.py
    tune      an S3 sweep (Ray Tune)                               xsam-tune    / pipelines/tune.py
    full_run  the workflow: convert -> S1 -> S2 -> S3 -> evaluate  xsam-run     / pipelines/full_run.py
    plan      the dry-run plan (no Ray)

Ray is imported inside the functions that use it, so `xsam` imports without a cluster.
"""

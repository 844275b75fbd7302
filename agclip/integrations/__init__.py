"""Trainer integrations, each imported on demand: ``agclip.integrations.lightning``
(a Lightning ``Callback``) and ``agclip.integrations.transformers`` (a Hugging
Face ``TrainerCallback``). Both clip through ``GradientClipCallback``."""

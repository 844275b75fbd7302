"""Hugging Face Trainer with agclip's clipping: a tiny GPT-2 built from a config
(no downloads), a few steps on CPU.

`max_grad_norm=0` switches the Trainer's own clipping off; the callback clips
before every optimizer step and the logs carry its pre-clip `grad_norm`.

    python examples/transformers_example.py
"""

from __future__ import annotations

import torch
import transformers

from agclip.integrations.transformers import GradientClippingCallback


def main() -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=128,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # a model built from a config names no loss: this one
    ids = torch.randint(0, 128, (32, 16))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir="out/transformers_example",
        max_grad_norm=0,  # instead of max_grad_norm=1.0: agclip clips
        per_device_train_batch_size=8,
        max_steps=6,
        learning_rate=1e-3,
        logging_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        callbacks=[GradientClippingCallback(max_norm=1.0)],
    )
    trainer.train()
    for entry in trainer.state.log_history:
        if "grad_norm" in entry:
            print(
                f"step {entry['step']}: loss {entry['loss']:.3f}, "
                f"pre-clip grad_norm {entry['grad_norm']:.3f}"
            )


if __name__ == "__main__":
    main()

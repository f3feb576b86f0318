"""What trains in each stage, decided in one place, and a table that shows it."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from torch import nn

from vlm.config import Config
from vlm.model import VLM


def configure_stage(model: VLM, config: Config) -> VLM:
    """Freeze and unfreeze for ``config.stage``; for ``instruct``, wrap the LM (and only the LM) with LoRA.

    align: the projector alone. instruct: the projector plus LoRA on every linear layer of the LM
    (or the whole LM with ``train.full_finetune``). The tower never trains. What trains is kept in fp32
    whatever the model's dtype: bf16 rounds away most small updates (the forward runs under autocast).
    """
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    if config.stage == "instruct":
        train = config.train
        llm = model.language_model
        if train.load_in_4bit:
            llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=train.gradient_checkpointing)
        if train.full_finetune:
            llm.requires_grad_(True)
        elif not hasattr(llm, "peft_config"):
            # PEFT is handed the LM alone: CLIP's attention also has q_proj/k_proj/v_proj, and a name list
            # applied to the whole VLM would wrap the frozen tower too. "all-linear" skips lm_head.
            lora = LoraConfig(r=train.lora_r, lora_alpha=train.lora_alpha, lora_dropout=train.lora_dropout,
                              target_modules=train.lora_target or "all-linear", task_type="CAUSAL_LM")
            llm = get_peft_model(llm, lora)
        else:  # resumed from an instruct checkpoint: its adapter trains on
            for name, parameter in llm.named_parameters():
                parameter.requires_grad_("lora_" in name)
        model.language_model = llm
    if config.train.gradient_checkpointing:
        model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.language_model.enable_input_require_grads()
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype in (torch.bfloat16, torch.float16):
            parameter.data = parameter.data.float()
    return model


def parameter_groups(model: VLM, config: Config) -> list[dict]:
    """The projector may learn at its own rate (LLaVA-1.5 stage 2: 2e-5 beside LoRA's 2e-4)."""
    train = config.train
    projector = [p for p in model.projector.parameters() if p.requires_grad]
    others = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("projector.")]
    groups = [{"params": projector, "lr": train.projector_lr or train.lr, "name": "projector"}]
    if others:
        groups.append({"params": others, "lr": train.lr, "name": "language_model"})
    for group in groups:
        group["weight_decay"] = train.weight_decay
    return groups


def trainable_table(model: nn.Module) -> str:
    """Parameters per component, and how many of them train."""
    rows = []
    for name, module in model.named_children():
        total = sum(p.numel() for p in module.parameters())
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        rows.append((name, total, trainable))
    total = sum(r[1] for r in rows)
    trainable = sum(r[2] for r in rows)
    lines = [f"{'component':<16}{'parameters':>15}{'trainable':>15}{'share':>9}"]
    for name, count, train_count in [*rows, ("total", total, trainable)]:
        share = 100 * train_count / count if count else 0.0
        lines.append(f"{name:<16}{count:>15,}{train_count:>15,}{share:>8.2f}%")
    return "\n".join(lines)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what trains: a checkpoint of a LoRA run need not carry 7B frozen weights."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in keep}

"""The mean teacher: an exponential moving average of the student."""

from __future__ import annotations

import torch
from torch import nn


def ema_decay(step: int, warmup_iters: int, max_decay: float) -> float:
    """DDFP's warm-started decay ``min(1 - 1 / (step - warmup_iters + 1), max_decay)``.

    The first semi-supervised step (``step == warmup_iters``) gives 0 (the teacher becomes the
    student); until ``1 / (1 - max_decay)`` steps later the teacher is the uniform average of
    every student since the warm-up, after that an exponential average with ``max_decay``.
    """
    return min(1.0 - 1.0 / max(step - warmup_iters + 1, 1), max_decay)


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, decay: float, statistics: str = "own") -> None:
    """``teacher = decay * teacher + (1 - decay) * student`` for parameters.

    ``statistics`` (``train.teacher_statistics``) says what happens to the buffers (BatchNorm
    statistics): ``"own"`` leaves the teacher's, as the reference; ``"student"`` copies the student's;
    ``"ema"`` averages floating-point buffers with the same decay (UniMatch V2) and copies the others
    (``num_batches_tracked``). The update is the same on every process, so teachers stay identical
    across ranks when students are.
    """
    teacher_params = [p for p in teacher.parameters()]
    student_params = [p.detach() for p in student.parameters()]
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - decay)
    if statistics == "own":
        return
    for teacher_buffer, student_buffer in zip(teacher.buffers(), student.buffers()):
        if statistics == "ema" and teacher_buffer.is_floating_point():
            teacher_buffer.lerp_(student_buffer, 1.0 - decay)
        else:
            teacher_buffer.copy_(student_buffer)

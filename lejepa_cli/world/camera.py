"""What a different camera does to a window of frames, as a training-time corruption.

    copy = camera_copy(frames, noise=0.1, hue=90.0, colour=0.3, generator=gen)   # uint8 in, uint8 out

A world model deployed behind another camera sees the same scene with sensor noise, a colour
cast, another white balance or exposure. `lejepa world stress` measures how far each of these
moves the model (pixel noise, colour shift, background shift); training on copies of each window
corrupted this way, with the copies' latents pulled to their mean (world/objective.py), keeps the
latent on the scene and off the sensor.

Per window (one camera for the whole window, as in a deployment) a copy draws: a hue rotation
about the grey axis in [-hue, hue] degrees (the same rotation the worlds' `hue_shift` applies to
their palette), a per-channel gain in [1 - colour, 1 + colour] and a brightness offset in
[-colour, colour], then Gaussian pixel noise of a std drawn in [0, noise] (per pixel and frame, like
the worlds' `noise`). The result is clipped and quantised back to uint8, as a camera stores it.
Every draw comes from `generator`, so a training step's copies are a pure function of its seed.
"""

from __future__ import annotations

import numpy as np
import torch

from lejepa_cli.world.render import hue_matrix


def hue_rotation(degrees: torch.Tensor) -> torch.Tensor:
    """(B,) angles in degrees -> (B, 3, 3) rotations of RGB about the grey axis (the worlds' `hue_shift`)."""
    matrices = np.stack([hue_matrix(a) for a in degrees.tolist()]) if len(degrees) else np.zeros((0, 3, 3))
    return torch.as_tensor(matrices, dtype=torch.float32, device=degrees.device)


def camera_copy(frames: torch.Tensor, *, noise: float, hue: float, colour: float,
                generator: torch.Generator) -> torch.Tensor:
    """uint8 windows (B, T, C, R, R) -> the same windows through another camera, uint8 (see the module
    docstring); a hue rotation needs RGB (C = 3)."""
    if frames.dim() != 5 or (hue > 0 and frames.shape[2] != 3):
        raise ValueError(f"camera_copy takes windows (B, T, C, R, R), RGB for a hue rotation; got {tuple(frames.shape)}")
    b, dev = frames.shape[0], frames.device

    def uniform(*shape: int) -> torch.Tensor:  # in [-1, 1)
        return torch.rand(*shape, generator=generator, device=dev) * 2 - 1

    x = frames.float() / 255.0
    if hue > 0:
        x = torch.einsum("bij,btjhw->btihw", hue_rotation(hue * uniform(b)), x)
    if colour > 0:
        gain = 1 + colour * uniform(b, 1, x.shape[2], 1, 1)
        x = x * gain + colour * uniform(b, 1, 1, 1, 1)
    if noise > 0:
        std = noise * (uniform(b, 1, 1, 1, 1) + 1) / 2
        x = x + std * torch.randn(x.shape, generator=generator, device=dev)
    return (x.clamp(0, 1) * 255.0).round().to(torch.uint8)

"""Corpus (refusal): an Adam optimizer that is not passed to florql.checkpointing.

Its moment estimates are state a checkpoint does not hold, so a replay from a checkpoint diverges:
florql warns at record time, `florql check` reports it, and the determinism audit stops the replay.
Lines starting with `# +` are the extra logs of the hindsight variant.
"""

import torch
from torch import nn

import florql

torch.manual_seed(0)
x = torch.randn(64, 6)
y = x @ torch.randn(6, 1)
model = nn.Linear(6, 1)
opt = torch.optim.Adam(model.parameters(), lr=0.05)

with florql.checkpointing(model=model, budget=0.9):
    for epoch in florql.loop("epoch", range(5)):
        for step in florql.loop("step", range(4)):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x[step * 16 : (step + 1) * 16]), y[step * 16 : (step + 1) * 16])
            loss.backward()
            opt.step()
            florql.log("loss", loss.item())
            # +florql.log("bias", model.bias.item())

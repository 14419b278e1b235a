"""Hindsight test script, a later version: the same training as version 1, with variables
renamed, lines inserted, and the hindsight statements `grad_norm` (per step) and `w_norm`
(per epoch) added."""

import contextlib
import random
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import florql


def describe(module: nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters())} parameters"


learning_rate = florql.arg("lr", 0.1)
n_epochs = florql.arg("epochs", 6)
seed = florql.arg("seed", 0)
ckpt = florql.arg("ckpt", True)
jitter = florql.arg("jitter", False)

random.seed(seed)
np.random.seed(seed)
torch.manual_seed(seed)
torch.set_num_threads(1)

rng = np.random.default_rng(seed)
features = torch.tensor(rng.normal(size=(240, 8)), dtype=torch.float32)
targets_all = torch.tensor(rng.integers(0, 3, 240), dtype=torch.int64)
train_loader = DataLoader(TensorDataset(features[:192], targets_all[:192]), batch_size=24, shuffle=True)
val_x, val_y = features[192:], targets_all[192:]

model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.9)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
loss_fn = nn.CrossEntropyLoss()
print("training", describe(model))
seen_batches = 0

guard = (
    florql.checkpointing(budget=0.9, model=model, optimizer=optimizer, scheduler=scheduler)
    if ckpt
    else contextlib.nullcontext()
)
with guard:
    for ep in florql.loop("epoch", range(n_epochs)):
        model.train()
        for inputs, targets in florql.loop("step", train_loader):
            optimizer.zero_grad()
            batch_loss = loss_fn(model(inputs), targets)
            batch_loss.backward()
            florql.log("grad_norm", float(torch.norm(torch.stack([p.grad.norm() for p in model.parameters()]))))
            optimizer.step()
            seen_batches += 1
            florql.log("loss", batch_loss.item())
        scheduler.step()
        model.eval()
        with torch.no_grad():
            predictions = model(val_x).argmax(dim=1)
            accuracy = (predictions == val_y).float().mean().item()
        florql.log("val_acc", accuracy)
        florql.log("w_norm", float(model[0].weight.detach().norm()))
        if jitter:
            florql.log("jitter", time.perf_counter_ns() % 1000003)
        time.sleep(0.05)

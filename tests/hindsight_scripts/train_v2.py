"""Hindsight test script, version 2: version 1 plus `grad_norm` (per step) and `w_norm` (per epoch).

`ckpt=False` records a run without checkpoints; `jitter=True` also logs a value that differs
on every execution, so a replay of such a run cannot be exact.
"""

import contextlib
import random
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import florql

lr = florql.arg("lr", 0.1)
epochs = florql.arg("epochs", 6)
seed = florql.arg("seed", 0)
ckpt = florql.arg("ckpt", True)
jitter = florql.arg("jitter", False)

random.seed(seed)
np.random.seed(seed)
torch.manual_seed(seed)
torch.set_num_threads(1)

data = np.random.default_rng(seed)
x_all = torch.tensor(data.normal(size=(240, 8)), dtype=torch.float32)
y_all = torch.tensor(data.integers(0, 3, 240), dtype=torch.int64)
loader = DataLoader(TensorDataset(x_all[:192], y_all[:192]), batch_size=24, shuffle=True)
x_val, y_val = x_all[192:], y_all[192:]

net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
criterion = nn.CrossEntropyLoss()

guard = (
    florql.checkpointing(budget=0.9, model=net, optimizer=opt, scheduler=sched) if ckpt else contextlib.nullcontext()
)
with guard:
    for epoch in florql.loop("epoch", range(epochs)):
        net.train()
        for x, y in florql.loop("step", loader):
            opt.zero_grad()
            loss = criterion(net(x), y)
            loss.backward()
            florql.log("grad_norm", float(torch.norm(torch.stack([p.grad.norm() for p in net.parameters()]))))
            opt.step()
            florql.log("loss", loss.item())
        sched.step()
        net.eval()
        with torch.no_grad():
            val_acc = (net(x_val).argmax(dim=1) == y_val).float().mean().item()
        florql.log("val_acc", val_acc)
        florql.log("w_norm", float(net[0].weight.detach().norm()))
        if jitter:
            florql.log("jitter", time.perf_counter_ns() % 1000003)
        time.sleep(0.05)  # lets each epoch's checkpoint finish persisting before the next one

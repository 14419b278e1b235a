"""Differential test script, minimal version: logs only `loss` (per step) and `val_acc` (per epoch).

full.py is this script plus hindsight statements (lines marked `# hindsight`); nothing else differs,
so the training, its RNG draws and the logged values are identical.
"""

import collections
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

random.seed(seed)
np.random.seed(seed)
torch.manual_seed(seed)
torch.set_num_threads(1)

data = np.random.default_rng(seed)
x_all = torch.tensor(data.normal(size=(180, 8)), dtype=torch.float32)
y_all = torch.tensor(data.integers(0, 3, 180), dtype=torch.int64)
loader = DataLoader(TensorDataset(x_all[:144], y_all[:144]), batch_size=24, shuffle=True)  # 6 steps
x_val, y_val = x_all[144:], y_all[144:]

net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
criterion = nn.CrossEntropyLoss()
recent_losses = collections.deque(maxlen=8)  # not plain data, no checkpoint holds it; spans two epochs (6 steps each)

with florql.checkpointing(budget=0.9, model=net, optimizer=opt, scheduler=sched):
    for epoch in florql.loop("epoch", range(epochs)):
        net.train()
        for x, y in florql.loop("step", loader):
            opt.zero_grad()
            loss = criterion(net(x), y)
            loss.backward()
            opt.step()
            recent_losses.append(loss.item())
            florql.log("loss", loss.item())
        sched.step()
        net.eval()
        with torch.no_grad():
            val_acc = (net(x_val).argmax(dim=1) == y_val).float().mean().item()
        florql.log("val_acc", val_acc)
        time.sleep(0.03)  # lets each epoch's checkpoint persist before the next one

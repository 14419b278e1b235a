"""Corpus: early stopping with patience; the epoch loop is left with `break` before its range ends.

A small classifier overfits noisy labels, so the validation loss stops improving after a few
epochs. `best_loss`, `bad_epochs` and `best_state` (a dict of tensors) are plain module globals.
Lines starting with `# +` are the extra logs of the ground-truth variant.
"""

import torch
from torch import nn

import florql

torch.manual_seed(0)
patience = florql.arg("patience", 2)
max_epochs = florql.arg("max_epochs", 40)

x = torch.randn(200, 10)
y = (x[:, 0] > 0).long()
flip = torch.rand(200) < 0.25
y[flip] = 1 - y[flip]
x_train, y_train, x_val, y_val = x[:140], y[:140], x[140:], y[140:]

model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 2))
optimizer = torch.optim.Adam(model.parameters(), lr=0.004)
scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=1)
criterion = nn.CrossEntropyLoss()
best_loss = float("inf")
bad_epochs = 0
best_state = None

with florql.checkpointing(model=model, optimizer=optimizer, scheduler=scheduler, budget=0.9):
    for epoch in florql.loop("epoch", range(max_epochs)):
        model.train()
        perm = torch.randperm(len(x_train))
        for step in florql.loop("step", range(0, len(x_train), 20)):
            idx = perm[step : step + 20]
            optimizer.zero_grad()
            loss = criterion(model(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
            florql.log("loss", loss.item())
            # +florql.log("weight_norm", model[0].weight.norm())
        model.eval()
        with torch.no_grad():
            val_loss = criterion(model(x_val), y_val).item()
        scheduler.step(val_loss)
        florql.log("val_loss", val_loss)
        # +florql.log("bad_epochs", bad_epochs)
        # +florql.log("lr", optimizer.param_groups[0]["lr"])
        if val_loss < best_loss:
            best_loss = val_loss
            bad_epochs = 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
            if bad_epochs > patience:
                # +florql.log("stopped_at", epoch)
                break
        # +florql.log("best_loss", best_loss)
        # +florql.log("best_state_norm", best_state["0.weight"].norm())

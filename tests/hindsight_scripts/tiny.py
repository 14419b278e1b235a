"""A tiny run without torch model code: `loss` per step and `val_acc` per epoch, both
deterministic functions of the args."""

import florql

lr = florql.arg("lr", 0.1)
seed = florql.arg("seed", 0)
for epoch in florql.loop("epoch", range(4)):
    for step in florql.loop("step", range(3)):
        florql.log("loss", 1.0 / (1 + epoch * 3 + step) + seed * 0.01)
    florql.log("val_acc", round(lr * (epoch + 1) + seed * 0.001, 6))

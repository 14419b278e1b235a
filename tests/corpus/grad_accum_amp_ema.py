"""Corpus: gradient accumulation with a GradScaler (CPU) and an EMA copy of the model, in main().

The loops run inside main(), so the plain state (`micro_steps`, `optimizer_steps`, `running`) is in
its locals. The scaler's growth interval is short so its scale changes during the run. Lines
starting with `# +` are the extra logs of the ground-truth variant.
"""

import copy

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import florql


class EMA(nn.Module):
    """An exponential moving average of a model's weights (its own module, so it has a state_dict)."""

    def __init__(self, model, decay):
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        self.decay = decay
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        for ema_v, v in zip(self.module.state_dict().values(), model.state_dict().values()):
            ema_v.copy_(ema_v * self.decay + (1.0 - self.decay) * v)


def main():
    torch.manual_seed(3)
    accum_steps = florql.arg("accum_steps", 4)
    epochs = florql.arg("epochs", 6)
    x = torch.randn(384, 12)
    y = (x[:, :4].sum(dim=1, keepdim=True) + 0.1 * torch.randn(384, 1)).tanh()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    model = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scaler = torch.amp.GradScaler("cpu", growth_interval=2)
    ema = EMA(model, decay=0.9)
    x_val, y_val = torch.randn(64, 12), None
    y_val = x_val[:, :4].sum(dim=1, keepdim=True).tanh()
    micro_steps = 0
    optimizer_steps = 0
    running = 0.0
    with florql.checkpointing(model=model, optimizer=optimizer, scaler=scaler, ema=ema, budget=0.9):
        for epoch in florql.loop("epoch", range(epochs)):
            model.train()
            optimizer.zero_grad(set_to_none=True)
            for i, (xb, yb) in florql.loop("step", enumerate(loader)):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
                    loss = nn.functional.mse_loss(model(xb), yb) / accum_steps
                scaler.scale(loss).backward()
                micro_steps += 1
                running = 0.9 * running + 0.1 * loss.item()
                if (i + 1) % accum_steps == 0:
                    scaler.unscale_(optimizer)
                    # +florql.log("grad_norm", torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    ema.update(model)
                    optimizer_steps += 1
                florql.log("loss", loss.item())
                # +florql.log("scale", scaler.get_scale())
            model.eval()
            with torch.no_grad():
                val = nn.functional.mse_loss(model(x_val), y_val).item()
                ema_val = nn.functional.mse_loss(ema.module(x_val), y_val).item()
            florql.log("val", val)
            # +florql.log("ema_val", ema_val)
            # +florql.log("running", running)
            # +florql.log("optimizer_steps", optimizer_steps)
            # +florql.log("ema_weight_norm", sum(p.norm() ** 2 for p in ema.module.parameters()).sqrt())


if __name__ == "__main__":
    main()

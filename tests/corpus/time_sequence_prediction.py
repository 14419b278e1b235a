"""Corpus: pytorch/examples' time_sequence_prediction, small.

Reads `traindata.pt` (over 1 MiB, made by the test as generate_sine_wave.py does) by relative
path; LBFGS calls a closure that logs the loss; a forward hook registered before the loop logs
(in the ground-truth variant) the LSTM cell's output. Lines starting with `# +` are the extra logs
of the ground-truth variant.
"""

import numpy as np
import torch
from torch import nn, optim

import florql


class Sequence(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm1 = nn.LSTMCell(1, 8)
        self.linear = nn.Linear(8, 1)

    def forward(self, input, future=0):
        outputs = []
        h_t = torch.zeros(input.size(0), 8, dtype=torch.double)
        c_t = torch.zeros(input.size(0), 8, dtype=torch.double)
        output = None
        for input_t in input.split(1, dim=1):
            h_t, c_t = self.lstm1(input_t, (h_t, c_t))
            output = self.linear(h_t)
            outputs += [output]
        for _ in range(future):
            h_t, c_t = self.lstm1(output, (h_t, c_t))
            output = self.linear(h_t)
            outputs += [output]
        return torch.cat(outputs, dim=1)


def log_cell_output(module, inputs, output):
    h_t, _ = output
    # +florql.log("cell_norm", h_t.norm())


def main():
    np.random.seed(0)
    torch.manual_seed(0)
    data = torch.load("traindata.pt", weights_only=False)[:, :24]
    input = torch.from_numpy(data[3:12, :-1])
    target = torch.from_numpy(data[3:12, 1:])
    test_input = torch.from_numpy(data[:3, :-1])
    test_target = torch.from_numpy(data[:3, 1:])
    seq = Sequence()
    seq.double()
    seq.lstm1.register_forward_hook(log_cell_output)
    criterion = nn.MSELoss()
    optimizer = optim.LBFGS(seq.parameters(), lr=0.8, max_iter=3)
    with florql.checkpointing(model=seq, optimizer=optimizer):
        for epoch in florql.loop("epoch", range(florql.arg("epochs", 5))):

            def closure():
                optimizer.zero_grad()
                out = seq(input)
                loss = criterion(out, target)
                florql.log("loss", loss.item())
                loss.backward()
                # +florql.log("grad_norm", torch.cat([p.grad.flatten() for p in seq.parameters()]).norm())
                return loss

            optimizer.step(closure)
            with torch.no_grad():
                pred = seq(test_input, future=4)
                florql.log("test_loss", criterion(pred[:, :-4], test_target).item())


if __name__ == "__main__":
    main()

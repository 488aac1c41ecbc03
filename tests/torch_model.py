"""The seed notebook's PyTorch network, as the tests' reference (torch is imported lazily)."""


def torch_simple_cnn(num_classes=10):
    import torch.nn as nn

    class SimpleCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 32, kernel_size=2, stride=2, padding=0)
            self.conv2 = nn.Conv2d(32, 64, kernel_size=2, stride=2, padding=1)
            self.conv3 = nn.Conv2d(64, 128, kernel_size=2, stride=2, padding=0)
            self.fc1 = nn.Linear(128 * 4 * 4, 250)
            self.fc2 = nn.Linear(250, num_classes)
            self.relu = nn.ReLU()
            self.flatten = nn.Flatten()

        def forward(self, x):
            x = self.relu(self.conv1(x))
            x = self.relu(self.conv2(x))
            x = self.relu(self.conv3(x))
            return self.fc2(self.relu(self.fc1(self.flatten(x))))

    return SimpleCNN()


def torch_lenet5(num_classes=10):
    """LeNet-5 for 28x28 (tanh, average pooling), written directly in torch.nn with the layer
    names of `xpcnn.models.LeNet5`."""
    import torch.nn as nn

    class LeNet5(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
            self.conv2 = nn.Conv2d(6, 16, 5)
            self.fc1 = nn.Linear(400, 120)
            self.fc2 = nn.Linear(120, 84)
            self.fc3 = nn.Linear(84, num_classes)

        def forward(self, x):
            pool, act = nn.functional.avg_pool2d, torch_tanh()
            x = pool(act(self.conv1(x)), 2)
            x = pool(act(self.conv2(x)), 2)
            x = act(self.fc1(x.flatten(1)))
            return self.fc3(act(self.fc2(x)))

    return LeNet5()


def torch_tanh():
    import torch

    return torch.tanh


def torch_minivgg(num_classes=10, widths=(32, 64, 128), hidden=256, p=0.5):
    """`xpcnn.models.MiniVGG` written directly in torch.nn (same names, so state dicts match)."""
    import torch.nn as nn

    class MiniVGG(nn.Module):
        def __init__(self):
            super().__init__()
            c = 1
            for i, w in enumerate(widths, start=1):
                setattr(self, f"conv{i}", nn.Conv2d(c, w, 3, padding=1, bias=False))
                setattr(self, f"bn{i}", nn.BatchNorm2d(w))
                c = w
            self.fc1 = nn.Linear(c * 9, hidden)
            self.dropout = nn.Dropout(p)
            self.fc2 = nn.Linear(hidden, num_classes)

        def forward(self, x):
            for i in range(1, len(widths) + 1):
                conv, bn = getattr(self, f"conv{i}"), getattr(self, f"bn{i}")
                x = nn.functional.max_pool2d(nn.functional.relu(bn(conv(x))), 2)
            x = nn.functional.relu(self.fc1(x.flatten(1)))
            return self.fc2(self.dropout(x))

    return MiniVGG()

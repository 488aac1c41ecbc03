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


def torch_minivgg(num_classes=10):
    """`xpcnn.models.MiniVGG` written directly in torch.nn (same names, so state dicts match)."""
    import torch.nn as nn

    class MiniVGG(nn.Module):
        def __init__(self):
            super().__init__()
            for i, (c, w) in enumerate([(1, 32), (32, 64), (64, 128), (128, 128)], start=1):
                setattr(self, f"conv{i}", nn.Conv2d(c, w, 3, padding=1, bias=False))
                setattr(self, f"bn{i}", nn.BatchNorm2d(w))
            self.fc1 = nn.Linear(128 * 7 * 7, 256)
            self.dropout = nn.Dropout(0.5)
            self.fc2 = nn.Linear(256, num_classes)

        def forward(self, x):
            f = nn.functional
            for i in range(1, 5):
                x = f.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
                if i <= 2:
                    x = f.max_pool2d(x, 2)
            x = f.relu(self.fc1(x.flatten(1)))
            return self.fc2(self.dropout(x))

    return MiniVGG()

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

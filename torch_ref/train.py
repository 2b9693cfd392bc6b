"""The notebooks' training loops in plain PyTorch, as they wrote them: notebook 000's ``train_model`` (its epoch,
``train_one_epoch``, averages the loss over samples) and notebook 004's ``train_epoch`` (over batches),
``evaluate`` and ``train_resnet``, over a ``DataLoader`` or ``torch_ref.data.PlannedBatches``. One addition:
``on_step(loss)`` gets each step's loss (read anyway), to show progress or stop a diverging run by raising.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.optim as optim

__all__ = ["evaluate", "make_optimizer", "make_scheduler", "train_epoch", "train_model", "train_one_epoch",
           "train_resnet"]

History = dict[str, list[float]]
StepHook = Callable[[float], None]


def make_optimizer(model: nn.Module | Iterable[nn.Parameter], lr: float, momentum: float,
                   weight_decay: float) -> optim.Optimizer:
    """The notebooks' ``optim.SGD(model.parameters(), lr, momentum, weight_decay)``; ``model`` may also be the
    parameters themselves (``parity.compare_training`` hands its factory a copy's)."""
    params = model.parameters() if isinstance(model, nn.Module) else model
    return optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def make_scheduler(optimizer: optim.Optimizer, schedule: str, epochs: int, milestones: Sequence[int] = (),
                   gamma: float = 0.1) -> optim.lr_scheduler.LRScheduler | None:
    """Notebook 000's ``MultiStepLR``, notebook 004's ``CosineAnnealingLR(T_max=epochs)``, or none ('constant')."""
    if schedule == "multistep":
        return optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)
    if schedule == "cosine":
        return optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if schedule == "constant":
        return None
    raise ValueError(f"unknown schedule {schedule!r}; choose multistep, cosine or constant")


def train_one_epoch(model: nn.Module, train_loader: Iterable, criterion: nn.Module, optimizer: optim.Optimizer,
                    device: torch.device | str, on_step: StepHook | None = None) -> tuple[float, float]:
    """The training phase of notebook 000's ``train_model``: loss averaged over samples."""
    model.train()
    running_loss = 0.0
    correct = 0
    total = 0

    for inputs, targets in train_loader:
        inputs, targets = inputs.to(device), targets.to(device)

        optimizer.zero_grad()
        outputs = model(inputs)
        loss = criterion(outputs, targets)
        loss.backward()
        optimizer.step()

        loss_value = loss.item()
        if on_step is not None:
            on_step(loss_value)
        running_loss += loss_value * inputs.size(0)
        _, predicted = outputs.max(1)
        total += targets.size(0)
        correct += predicted.eq(targets).sum().item()

    return running_loss / total, 100.0 * correct / total


def train_epoch(model: nn.Module, trainloader: Iterable, criterion: nn.Module, optimizer: optim.Optimizer,
                device: torch.device | str, on_step: StepHook | None = None) -> tuple[float, float]:
    """Notebook 004's ``train_epoch``: loss averaged over batches (``len(trainloader)``)."""
    model.train()
    running_loss = 0.0
    correct = 0
    total = 0

    for inputs, labels in trainloader:
        inputs, labels = inputs.to(device), labels.to(device)

        optimizer.zero_grad()
        outputs = model(inputs)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()

        loss_value = loss.item()
        if on_step is not None:
            on_step(loss_value)
        running_loss += loss_value
        _, predicted = outputs.max(1)
        total += labels.size(0)
        correct += predicted.eq(labels).sum().item()

    return running_loss / len(trainloader), 100.0 * correct / total


def evaluate(model: nn.Module, testloader: Iterable, criterion: nn.Module, device: torch.device | str
             ) -> tuple[float, float]:
    """Notebook 004's ``evaluate``: mean over test batches of the batch-mean loss, and accuracy."""
    model.eval()
    running_loss = 0.0
    correct = 0
    total = 0

    with torch.no_grad():
        for inputs, labels in testloader:
            inputs, labels = inputs.to(device), labels.to(device)
            outputs = model(inputs)
            loss = criterion(outputs, labels)

            running_loss += loss.item()
            _, predicted = outputs.max(1)
            total += labels.size(0)
            correct += predicted.eq(labels).sum().item()

    return running_loss / len(testloader), 100.0 * correct / total


def train_model(model: nn.Module, train_loader: Iterable, test_loader: Iterable, epochs: int = 15, lr: float = 0.1,
                device: torch.device | str = "cpu") -> History:
    """Notebook 000's ``train_model``: SGD(lr, 0.9, wd 1e-4), MultiStepLR([8, 12], 0.1), loss over samples."""
    model = model.to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = make_optimizer(model, lr, 0.9, 1e-4)
    scheduler = make_scheduler(optimizer, "multistep", epochs, milestones=(8, 12), gamma=0.1)
    history: History = {"train_loss": [], "train_acc": [], "test_acc": []}
    for _ in range(epochs):
        train_loss, train_acc = train_one_epoch(model, train_loader, criterion, optimizer, device)
        scheduler.step()
        _, test_acc = evaluate(model, test_loader, criterion, device)
        history["train_loss"].append(train_loss)
        history["train_acc"].append(train_acc)
        history["test_acc"].append(test_acc)
    return history


def train_resnet(model: nn.Module, trainloader: Iterable, testloader: Iterable, epochs: int = 20, lr: float = 0.1,
                 device: torch.device | str = "cpu") -> tuple[nn.Module, float, History]:
    """Notebook 004's ``train_resnet``: SGD(lr, 0.9, wd 5e-4), CosineAnnealingLR(T_max=epochs), loss over batches;
    returns ``(model, final test accuracy, history)``."""
    model = model.to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = make_optimizer(model, lr, 0.9, 5e-4)
    scheduler = make_scheduler(optimizer, "cosine", epochs)
    history: History = {"train_loss": [], "train_acc": [], "test_loss": [], "test_acc": []}
    for epoch in range(epochs):
        train_loss, train_acc = train_epoch(model, trainloader, criterion, optimizer, device)
        test_loss, test_acc = evaluate(model, testloader, criterion, device)
        scheduler.step()
        for key, value in zip(history, (train_loss, train_acc, test_loss, test_acc), strict=True):
            history[key].append(value)
        print(f"Epoch {epoch + 1}/{epochs}: Train Loss: {train_loss:.4f}, Train Acc: {train_acc:.2f}%, "
              f"Test Loss: {test_loss:.4f}, Test Acc: {test_acc:.2f}%")
    return model, test_acc, history

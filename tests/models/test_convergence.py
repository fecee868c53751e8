"""Forward and backward right together: a reduced Vim learns scikit-learn's handwritten digits on CPU."""
import time

import pytest
import torch
import torch.nn.functional as F

from vim.models import VisionMamba

sklearn_datasets = pytest.importorskip('sklearn.datasets')


@pytest.fixture
def one_thread():
    """Tiny ops: one thread is fastest, and immune to OpenMP spin-waits when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_reduced_vim_learns_digits(one_thread):
    digits = sklearn_datasets.load_digits()  # 1797 8x8 images, 10 classes, shipped with scikit-learn
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(16, 16), mode='bilinear', align_corners=False)
    x = ((x - x.mean()) / x.std()).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]

    torch.manual_seed(0)
    model = VisionMamba(img_size=16, patch_size=4, embed_dim=48, depth=4, d_state=4, num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    epochs, batch = 12, 50
    steps = epochs * (len(train) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = train[torch.randperm(len(train))]
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(-1) == y[test]).float().mean().item()
    elapsed = time.perf_counter() - start
    print(f'digits held-out accuracy {accuracy:.3f} after {steps} steps in {elapsed:.0f}s')
    assert accuracy >= 0.90

"""checks/official.py's own logic, without the official repositories (CI has none): the comparison
and its verdict, the key mapping, and a whole moco check against a small stand-in "official"
MoCo written here (a faithful one must come out EQUAL, one with a defect DIFFERENT)."""
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from conftest import REPO

sys.path.insert(0, str(REPO / "checks"))
import official  # noqa: E402

# A stand-in for facebookresearch/moco's moco/builder.py: the same interface (MoCo(base_encoder, dim,
# K, m, T, mlp), encoder_q/encoder_k/queue/queue_ptr, forward -> logits, labels), written for this test.
STAND_IN = '''
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class MoCo(nn.Module):
    def __init__(self, base_encoder, dim=128, K=65536, m=0.999, T=0.07, mlp=False):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.encoder_q, self.encoder_k = base_encoder(num_classes=dim), base_encoder(num_classes=dim)
        if mlp:
            for enc in (self.encoder_q, self.encoder_k):
                hidden = enc.fc.weight.shape[1]
                enc.fc = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), enc.fc)
        for q, k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            k.data.copy_(q.data)
            k.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def gather(self, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x)
        return torch.cat(out)

    def ema(self):
        for q, k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            k.data = k.data * self.m + q.data * (1.0 - self.m)

    def forward(self, im_q, im_k):
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            EMA_BEFORE
            x = self.gather(im_k)
            perm = torch.randperm(x.shape[0]).cuda()
            dist.broadcast(perm, src=0)
            mine = perm.view(dist.get_world_size(), -1)[dist.get_rank()]
            k = F.normalize(self.encoder_k(x[mine]), dim=1)
            k = self.gather(k)[torch.argsort(perm).view(dist.get_world_size(), -1)[dist.get_rank()]]
            EMA_AFTER
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue.clone().detach()], 1) / self.T
        keys = self.gather(k)
        ptr = int(self.queue_ptr)
        self.queue[:, ptr:ptr + keys.shape[0]] = keys.T
        self.queue_ptr[0] = (ptr + keys.shape[0]) % self.K
        return logits, torch.zeros(logits.shape[0], dtype=torch.long).cuda()
'''


def write_stand_in(folder, ema_after_keys=False):
    """The stand-in repository; with ema_after_keys, the defect of updating the key encoder after it
    computed the keys (the paper updates it first)."""
    code = STAND_IN.replace("EMA_BEFORE", "pass" if ema_after_keys else "self.ema()")
    code = code.replace("EMA_AFTER", "self.ema()" if ema_after_keys else "pass")
    (folder / "moco").mkdir()
    (folder / "moco" / "builder.py").write_text(textwrap.dedent(code))
    return folder


def test_table_verdicts():
    t = official.Table(atol=1e-10, rtol=1e-7)
    ref = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.5])}
    t.add("equal", ref, {"a": torch.tensor([1.0, -2.0 + 1e-9]), "b": torch.tensor([0.5])})
    t.add("off", ref, {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.5001])})
    t.add("nan", torch.tensor([1.0]), torch.tensor([float("nan")]))
    assert [r[3] for r in t.rows] == ["EQUAL", "DIFFERENT", "DIFFERENT"]
    assert t.rows[1][4] == "b" and t.rows[1][1] == pytest.approx(1e-4, rel=1e-3)  # the worst tensor is named
    assert t.rows[1][2] == pytest.approx(1e-4 / 0.5, rel=1e-3)  # relative to max|official| of that tensor
    assert not t.equal
    assert "DIFFERENT | (worst: b)" in t.format()
    with pytest.raises(KeyError, match="keys differ"):
        t.add("keys", ref, {"a": ref["a"]})
    merged = official.Table()
    merged.add("x", torch.zeros(1), torch.zeros(1))
    other = official.Table()
    other.add("x", torch.zeros(1), torch.ones(1))
    assert merged.merge(other).rows[0][3] == "DIFFERENT"  # one rank's difference makes the row DIFFERENT


def test_key_mapping_is_complete_and_exact():
    mine = nn.Sequential(nn.Linear(2, 3))
    state = {"fc.weight": torch.ones(3, 2), "fc.bias": torch.zeros(3), "extra": torch.zeros(1)}
    rename = lambda k: None if k == "extra" else k.replace("fc.", "0.")
    official.load_mapped(mine, state, rename)
    assert torch.equal(mine[0].weight, torch.ones(3, 2))
    with pytest.raises(KeyError, match="not filled"):
        official.load_mapped(mine, {"fc.weight": torch.ones(3, 2)}, rename)
    with pytest.raises(KeyError, match="no such key"):
        official.load_mapped(mine, state, lambda k: k.replace("fc.", "0."))
    with pytest.raises(ValueError, match="shape"):
        official.load_mapped(mine, {"fc.weight": torch.ones(2, 3), "fc.bias": torch.zeros(3)}, rename)
    with pytest.raises(KeyError, match="mapped twice"):
        official.map_keys(state, lambda k: "same")


def test_commit_without_git(tmp_path):
    assert official.official_commit(tmp_path) == "unknown"
    assert official.official_commit(tmp_path, "abc123") == "abc123"


@pytest.mark.parametrize("defect", [False, True], ids=["faithful", "ema-after-keys"])
def test_moco_check_against_stand_in(tmp_path, capsys, defect):
    """The whole moco check in one gloo process: identical weights (mapped), views and shuffle
    permutations give EQUAL; a stand-in whose key encoder moves after the keys gives DIFFERENT and
    exit status 1."""
    path = write_stand_in(tmp_path, ema_after_keys=defect)
    rc = official.main(["moco", "--official", str(path), "--world", "1", "--steps", "2", "--image-size", "32"])
    out = capsys.readouterr().out
    assert "at unknown" in out and "stand-in: torch.Tensor.cuda" in out
    rows = {line.split("|")[1].strip(): line.split("|")[4].strip() for line in out.splitlines()
            if line.startswith("| step") or line.startswith("| after")}
    if defect:
        assert rc == 1 and "moco: DIFFERENT" in out
        # step 1: the key encoder still equals the query encoder, so when it moves does not matter yet
        assert rows["step 1: loss"] == "EQUAL" and rows["step 2: loss"] == "DIFFERENT"
        # the EMA itself is the same update, only later in the step: the keys (so the queue) differ, not its weights
        assert rows["after 2: queue"] == "DIFFERENT" and rows["after 2: key encoder (EMA) weights (64 tensors)"] == "EQUAL"
    else:
        assert rc == 0 and "moco: EQUAL" in out and "DIFFERENT" not in out

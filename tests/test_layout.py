"""The layout's promises: each loss file copies alone into another project and computes there what it computes here;
the algorithm's files never import lab/ (only the entry points wire it in); the modules import one another in one
direction, with no cycle; the README keeps the reader's page short, with the loss near its top."""
import ast
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import apa
import grpo
import ppo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = {"train", "reward_model"}                                 # they alone may import lab/

# each loss file's functions on random tensors, seeded, written as a program that prints its results as JSON: the
# same program runs on the copy in an empty folder and on the file here
B, T = 6, 5
PROGRAMS = {
    "apa": """
lp, olp, rlp, adv = (torch.randn(B, T, dtype=torch.float64) for _ in range(4))
lp.requires_grad_(True)
mask = (torch.rand(B, T, dtype=torch.float64) > 0.3).double()
out = {}
for name, kw in [("default", {}), ("paper", {"ref_logprobs": rlp}), ("bounded", {"clip": 0.5})]:
    loss, stats = m.apa_loss(lp, olp, adv, mask, 0.1, **kw)
    loss.backward()
    out[name] = [loss.item(), lp.grad.sum().item(), stats]
    lp.grad = None
loss, stats = m.awr_loss(lp, olp, adv, mask, 0.5)
out["awr"] = [loss.item(), stats]
""",
    "ppo": """
lp, olp, rlp, adv, v, ov, ret = (torch.randn(B, T, dtype=torch.float64) for _ in range(7))
lp.requires_grad_(True)
mask = torch.ones(B, T, dtype=torch.float64)
mask[:, 3:] = 0
loss, stats = m.ppo_policy_loss(lp, olp, adv, mask)
vf, vf_stats = m.value_loss(v, ov, ret, mask)
rewards = m.kl_penalized_rewards(torch.randn(B, dtype=torch.float64), olp, rlp, mask, 0.1)
advantages, returns = m.gae(rewards, ov, mask, 1.0, 0.95)
out = {"ppo": [loss.item(), stats], "vf": [vf.item(), vf_stats], "gae": [advantages.sum().item(), returns.sum().item()],
       "whiten": m.masked_whiten(adv, mask).sum().item(), "approx_kl": m.approx_kl(lp, olp, mask)}
""",
    "grpo": """
lp, olp, rlp = (torch.randn(B * 2, T, dtype=torch.float64) for _ in range(3))
lp.requires_grad_(True)
mask = torch.ones(B * 2, T, dtype=torch.float64)
scores = torch.randn(B * 2, dtype=torch.float64)
adv = m.group_advantages(scores, 4)[:, None] * mask
out = {"rloo": m.rloo_advantages(scores, 4).tolist(), "drgrpo": m.group_advantages(scores, 4, std=False).tolist()}
for name in [None, *m.KL_ESTIMATORS]:
    loss, stats = m.grpo_loss(lp, olp, rlp, adv, mask, 0.1, kl_estimator=m.KL_ESTIMATORS.get(name))
    out[str(name)] = [loss.item(), stats]
""",
}


def run(name, m):
    """PROGRAMS[name] run with m as the module: its results, which JSON can write."""
    scope = {"torch": torch, "m": m, "B": B, "T": T}
    torch.manual_seed(0)
    exec(PROGRAMS[name], scope)
    return scope["out"]


@pytest.mark.parametrize("name", ["apa", "ppo", "grpo"])
def test_each_loss_file_copies_alone_into_an_empty_folder_and_computes_the_same(name, tmp_path):
    """Copied alone into an empty folder, the file imports with torch and the standard library only (none of this
    project's modules, nor transformers, tiktoken or numpy), its losses run, and they give the numbers they give here.
    Every stat is a Python float, as the docstrings say."""
    shutil.copy(os.path.join(ROOT, f"{name}.py"), tmp_path)
    program = (f"import json, sys, torch\nBEFORE = set(sys.modules)\nimport {name} as m\n"
               f"foreign = sorted(k for k in set(sys.modules) - BEFORE if k.split('.')[0] not in ('torch', '{name}') "
               "and k.split('.')[0] not in sys.stdlib_module_names)\n"
               f"B, T = {B}, {T}\ntorch.manual_seed(0)\n" + PROGRAMS[name]
               + "\nprint(json.dumps({'out': out, 'foreign': foreign}))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    result = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    copied = json.loads(result.stdout.splitlines()[-1])
    assert copied["foreign"] == []                                       # nothing but torch and the standard library
    here = run(name, {"apa": apa, "ppo": ppo, "grpo": grpo}[name])
    assert copied["out"] == json.loads(json.dumps(here))                 # the copy computes what the file computes here

    def floats(x):
        return all(map(floats, x.values())) if isinstance(x, dict) else (
            all(map(floats, x)) if isinstance(x, list) else isinstance(x, float))
    stats = [v[-1] for v in here.values() if isinstance(v, list) and isinstance(v[-1], dict)]
    assert stats and all(floats(s) for s in stats)


def test_grpo_loss_without_a_kl_term_is_ppos_clipped_surrogate():
    """grpo_loss with the KL in the reward (kl_estimator=None), as train.py runs RLOO and GRPO with --kl=reward, is
    ppo_policy_loss to the last bit: the loss, its gradient and the stats."""
    torch.manual_seed(1)
    lp = torch.randn(8, 6, requires_grad=True)
    olp, rlp, adv = torch.randn(8, 6), torch.randn(8, 6), torch.randn(8, 6)
    mask = (torch.rand(8, 6) > 0.2).float()
    ours, ours_stats = grpo.grpo_loss(lp, olp, rlp, adv, mask, 0.1, 0.2, None)
    (g_ours,) = torch.autograd.grad(ours, lp)
    theirs, theirs_stats = ppo.ppo_policy_loss(lp, olp, adv, mask, 0.2)
    (g_theirs,) = torch.autograd.grad(theirs, lp)
    assert torch.equal(ours, theirs) and torch.equal(g_ours, g_theirs) and ours_stats == theirs_stats
    with_k3, stats = grpo.grpo_loss(lp, olp, rlp, adv, mask, 0.1, 0.2, grpo.k3)
    assert with_k3.item() == pytest.approx(theirs.item() + 0.1 * stats["k3"], abs=1e-6) and stats["k3"] > 0


def imports_of(path):
    """Every module a file imports, at any level (functions included), as top-level names: 'lab.hf' -> 'lab.hf'."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # from lab import hf -> lab.hf
    return names


def project_modules():
    """The project's modules, by dotted name: the top-level files, lab/ and experiments/."""
    modules = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}
    for package in ("lab", "experiments"):
        for f in os.listdir(os.path.join(ROOT, package)):
            if f.endswith(".py") and f != "__init__.py":
                modules[f"{package}.{f[:-3]}"] = os.path.join(ROOT, package, f)
    return modules


def test_the_algorithm_never_imports_lab_and_the_imports_run_one_way():
    """No top-level module but the entry points imports lab/, at any level; lab/ never imports an entry point or an
    experiment; and the project's imports, function-level ones included, have no cycle."""
    modules = project_modules()
    graph = {name: {m for m in imports_of(path) if m in modules} for name, path in modules.items()}
    top = {name for name in modules if "." not in name and not name.startswith("test_")}
    assert {"apa", "ppo", "grpo", "data", "model", "evaluation", "train"} <= top
    reaching = {name: sorted(m for m in graph[name] if m.startswith("lab.")) for name in top - ENTRY_POINTS}
    assert {name: m for name, m in reaching.items() if m} == {}
    for name in (n for n in modules if n.startswith("lab.")):
        assert not graph[name] & (ENTRY_POINTS | {n for n in modules if n.startswith("experiments.")}), name
    for loss_file in ("apa", "ppo", "grpo"):
        assert graph[loss_file] == set(), loss_file
    done, stack = set(), []

    def visit(name):                                                     # depth-first: a name met on the stack is a cycle
        assert name not in stack, f"import cycle: {' -> '.join(stack[stack.index(name):] + [name])}"
        if name in done:
            return
        stack.append(name)
        for other in sorted(graph[name]):
            visit(other)
        stack.pop()
        done.add(name)
    for name in sorted(graph):
        visit(name)


def test_the_readme_is_a_short_page_with_the_loss_near_its_top():
    lines = open(os.path.join(ROOT, "README.md")).read().splitlines()
    assert len(lines) <= 300
    assert any("L_APA(theta) =" in line for line in lines[:80])
    assert any("pg_loss = masked_mean((logprobs - target) ** 2, mask)" in line for line in lines[:80])
    code = open(os.path.join(ROOT, "apa.py")).read()
    assert "pg_loss = masked_mean((logprobs - target) ** 2, mask)" in code  # the README shows the code as it is


def test_the_readmes_line_counts_are_the_files():
    """The README's opening gives the files' lengths ("`apa.py` 78", "`minimal.py` first** (350 lines)") and their
    sum ("about 1,200 lines in seven files"): each is the file's count of lines now, the sum rounded to hundreds."""
    text = open(os.path.join(ROOT, "README.md")).read()
    count = {}
    for name, n in re.findall(r"`(\w+\.py)`\s+(\d+)\b", text) + re.findall(r"`(\w+\.py)` first\*\* \((\d+) lines\)", text):
        with open(os.path.join(ROOT, name)) as f:
            count[name] = len(f.read().splitlines())
        assert count[name] == int(n), f"README: {name} {n}, but it has {count[name]} lines"
    assert {"apa.py", "ppo.py", "train.py", "minimal.py", "reward_model.py"} <= count.keys()
    total, files = re.search(r"about ([\d,]+) lines in seven files \(([^)]*)\)", text).groups()
    seven = re.findall(r"`(\w+\.py)`", files)
    assert len(seven) == 7 and round(sum(count[f] for f in seven), -2) == int(total.replace(",", ""))


def test_the_reward_models_fields_of_pi_init_are_train_pys():
    """reward_model.py repeats train.py's fields of pi_init and of its sampling, so that both read one cached pi_init
    and sample alike: the same names, the same defaults."""
    import reward_model
    import train
    shared = ("init", "tokenizer", "n_layer", "n_head", "n_embd", "block_size", "sft_steps", "sft_lr", "sft_dir",
              "max_new_tokens", "threads", "device")
    assert {f: getattr(reward_model.Config(), f) for f in shared} == {f: getattr(train.Config(), f) for f in shared}

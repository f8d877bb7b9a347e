"""minimal.py, the one-file edition of train.py: it prints train.py's numbers, its copies of the losses are their
originals' text, and it stands alone in at most 350 lines."""
import ast
import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import GPT2LMHeadModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import minimal  # noqa: E402
import train  # noqa: E402
from lab import runs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPIED = {"masked_mean", "approx_kl", "kl_penalized_rewards", "gae", "masked_whiten", "apa_loss", "ppo_policy_loss",
          "value_loss"}                                                  # what minimal.py copies from apa.py and ppo.py
SHOWN = ["reward", "kl", "J", "gap", "approx_kl", "vf_loss"]             # the numbers that both print


def printed(out):
    """The iteration lines of a run's output -> [{name: the printed digits}], and the printed J*."""
    lines = [line for line in out.splitlines() if line.startswith("iter ")]
    rows = [dict(re.findall(r"(\w+) (-?\d+\.\d+)(?= \|)", line)) for line in lines]
    return rows, re.search(r"J\* (-?\d+\.\d+)", out).group(1)


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """The default pi_init, pre-trained once into a cache as train.py builds it (out/sft's folder)."""
    folder = tmp_path_factory.mktemp("sft_default")
    runs.cached_pretrain(train.resolve(train.Config(sft_dir=str(folder))), data.task_encoding(), torch.device("cpu"))
    return folder


@pytest.mark.parametrize("algo", ["apa", "ppo"])
def test_minimal_prints_the_numbers_of_train_py_for_the_default_config(algo, sft, tmp_path, capsys):
    """train.py's default config (only the iterations cut to 20) and minimal.py's, on the same pi_init: every
    printed digit of reward, kl, J, gap, approx_kl and vf_loss is the same at each of the 20 iterations, and so is J*;
    the trained weights, the network's and the value head's, are the same to the bit. Both read pi_init from one
    cache, as from out/sft; train.py runs as a command beside minimal.py, on the other core."""
    proc = subprocess.Popen([sys.executable, "train.py", f"--algo={algo}", "--iters=20", f"--sft_dir={sft}",
                             f"--out_dir={tmp_path / 'train'}"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    policy = minimal.main([f"--algo={algo}", "--iters=20", f"--sft_dir={sft}"])
    one_file, one_file_jstar = printed(capsys.readouterr().out)
    out, _ = proc.communicate()
    assert proc.returncode == 0, out
    full, full_jstar = printed(out)
    assert len(full) == len(one_file) == 20 and full_jstar == one_file_jstar
    for it, (a, b) in enumerate(zip(full, one_file), 1):
        assert {k: a[k] for k in SHOWN} == {k: b[k] for k in SHOWN}, f"iteration {it}"
    assert len({row["reward"] for row in full}) > 10                    # the runs move: 20 different batches
    saved = tmp_path / "train" / "policy"                               # train.py's trained policy
    theirs = {**GPT2LMHeadModel.from_pretrained(saved).state_dict(),
              **{f"v_head.{k}": v for k, v in torch.load(saved / "value_head.pt").items()}}
    ours = {**policy.lm.state_dict(), **{f"v_head.{k}": v for k, v in policy.v_head.state_dict().items()}}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    pi_init = GPT2LMHeadModel.from_pretrained(next(sft.iterdir())).state_dict()
    name = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.equal(ours[name], pi_init[name])                    # and they trained


def test_minimal_stops_an_update_where_train_py_s_kl_guard_does(sft, tmp_path, capsys):
    """A larger step and a tight guard (lr 3e-4, target_kl 0.01), so that the KL guard stops updates early: minimal.py
    stops them where train.py does and prints the same numbers after them."""
    flags = ["--lr=3e-4", "--target_kl=0.01", "--iters=8", "--jstar_samples=16"]
    train.main(flags + [f"--sft_dir={sft}", f"--out_dir={tmp_path}"])
    out = capsys.readouterr().out
    minimal.main(flags + [f"--sft_dir={sft}"])
    (full, _), (one_file, _) = printed(out), printed(capsys.readouterr().out)
    stopped = [i for i, line in enumerate(l for l in out.splitlines() if l.startswith("iter ")) if "target_kl" in line]
    assert stopped and stopped[0] < 7                                    # the guard acts, and iterations follow
    assert [{k: r[k] for k in SHOWN} for r in full] == [{k: r[k] for k in SHOWN} for r in one_file]


def test_minimal_has_train_pys_defaults():
    """Every field of minimal.py's config, and the tiny GPT's shape and pre-training, default to train.py's values
    (the learning rate as train.resolve fills it in): "the same config" means the defaults of both."""
    full = train.resolve(train.Config())
    for name, value in vars(minimal.Config()).items():
        assert getattr(full, name) == value, name
    assert (minimal.N_LAYER, minimal.N_HEAD, minimal.N_EMBD, minimal.BLOCK_SIZE, minimal.SFT_STEPS, minimal.SFT_LR) == (
        full.n_layer, full.n_head, full.n_embd, full.block_size, full.sft_steps, full.sft_lr)


def test_minimal_pretrains_the_pi_init_that_train_py_caches(tmp_path, monkeypatch):
    """Without a cache, minimal.py pre-trains pi_init as model.pretrain does and caches it in the folder that train.py
    reads: the same name and the same weights, to the bit (a short pre-training of 4 steps)."""
    monkeypatch.setattr(minimal, "SFT_STEPS", 4)
    enc = data.task_encoding()
    ours = minimal.load_pi_init(minimal.Config(sft_dir=str(tmp_path / "one_file")), enc)
    cfg = train.Config(sft_steps=4, sft_dir=str(tmp_path / "full"))
    theirs = runs.cached_pretrain(cfg, enc, torch.device("cpu"))
    assert os.listdir(tmp_path / "one_file") == os.listdir(tmp_path / "full")  # one folder, one name
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())  # frozen


def functions(path):
    """{name: (source text of the function without its docstring, the comment lines above it)} of a file."""
    text = open(os.path.join(ROOT, path)).read()
    lines, out = text.splitlines(), {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef):
            start = (node.decorator_list[0] if node.decorator_list else node).lineno - 1
            body = lines[start:node.end_lineno]
            doc = node.body[0]
            if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
                del body[doc.lineno - 1 - start:doc.end_lineno - start]      # the docstring's lines
            above = start
            while above > 0 and lines[above - 1].startswith("#"):            # the comment block above it
                above -= 1
            out[node.name] = ("\n".join(body), "\n".join(lines[above:start]))
    return out


def test_the_copied_functions_are_their_originals_text():
    """Each function of minimal.py marked "# copy of FILE: NAME" is the text of FILE's NAME, line for line, without
    the docstring; every copy is marked; and it copies all of the losses, GAE and the KL-penalised reward."""
    ours, originals = functions("minimal.py"), {f: functions(f) for f in ("apa.py", "ppo.py")}
    marked = {}
    for name, (body, above) in ours.items():
        match = re.match(r"# copy of (\w+\.py): (\w+)\b", above)
        if match:
            assert match.group(2) == name, above
            marked[name] = match.group(1)
            assert body == originals[match.group(1)][name][0], f"minimal.py's {name} is not {match.group(1)}'s"
    assert set(marked) == COPIED
    for name in ours.keys() - COPIED:                                    # no copy left unmarked
        assert all(name not in functions_of for functions_of in originals.values()), name


def test_the_copy_check_fails_on_a_changed_line(tmp_path, monkeypatch):
    """The check above is not blind: one changed character in a copy makes it fail."""
    text = open(os.path.join(ROOT, "minimal.py")).read()
    changed = text.replace("(advantages / lam).clamp(-clip, clip)", "(advantages / lam).clamp(-clip, 2 * clip)")
    assert changed != text
    (tmp_path / "minimal.py").write_text(changed)
    for f in ("apa.py", "ppo.py"):
        (tmp_path / f).write_text(open(os.path.join(ROOT, f)).read())
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    with pytest.raises(AssertionError, match="apa_loss"):
        test_the_copied_functions_are_their_originals_text()


def test_minimal_stands_alone_in_at_most_350_lines():
    """At most 350 lines with its docstring, and it imports only torch, transformers, numpy, the standard library
    and data.py (the embedded task): nothing else of the project."""
    text = open(os.path.join(ROOT, "minimal.py")).read()
    assert len(text.splitlines()) <= 350
    imported = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    allowed = {"torch", "transformers", "numpy", "data"} | sys.stdlib_module_names
    assert imported and imported <= allowed, imported - allowed

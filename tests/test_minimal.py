"""minimal.py, the one-file edition of train.py: it prints train.py's numbers, its copies of the losses are their
originals' text, and it stands alone in at most 350 lines."""
import ast
import copy
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
import model  # noqa: E402
import train  # noqa: E402
from lab import cli, runs  # noqa: E402

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


def test_minimal_reads_its_flags_as_train_py_does():
    """The same flags give minimal.py's config and train.py's the same values, each of the type of train.py's field."""
    flags = ["--algo=ppo", "--lam=0.05", "--lr=3e-4", "--iters=8", "--batch_size=32", "--minibatch_size=16",
             "--target_kl=0", "--jstar_samples=16", "--sft_dir=elsewhere"]
    ours, full = minimal.parse_args(flags), train.resolve(cli.parse_args(train.Config, flags))
    for name, value in vars(ours).items():
        assert value == getattr(full, name) and type(value) is type(getattr(full, name)), name


def tiny_random_gpt(enc):
    """The tiny GPT of train.py's default config with random weights, its last layer norm's bias moved along the row of
    end-of-text so that every step draws end-of-text with a probability near 10%: some responses end early, others run
    to the limit, and after an end-of-text other tokens stay likely."""
    torch.manual_seed(0)
    lm = model.tiny_gpt(train.resolve(train.Config()), enc.n_vocab).eval()
    with torch.no_grad():
        row = lm.transformer.wte.weight[enc.eot_token]                    # (H,) the LM head's row of end-of-text
        lm.transformer.ln_f.bias += 3 * row / row.norm() ** 2            # its logit 3 higher at every position
    return lm


def test_minimal_samples_what_train_py_samples_and_its_logprobs_are_a_full_forward_pass():
    """minimal.sample and train.py's sampler (model.sample, model.generate), from one seed: the same prompts, response,
    mask, log-probs and completions, for 64 prompts in random order. And the log-probs are those of one forward pass
    over prompt and response (minimal.lm_forward, then minimal.token_logprobs)."""
    enc, prompts = data.task_encoding(), data.task_prompts()
    prompt_tokens = [enc.encode_ordinary(p) for p in prompts]
    lm = tiny_random_gpt(enc)
    idx = torch.randint(len(prompts), (64,)).tolist()
    torch.manual_seed(1)
    ours = minimal.sample(minimal.Config(), lm, idx, prompt_tokens, enc)
    torch.manual_seed(1)
    theirs = model.sample(train.Config(device="cpu"), lm, idx, prompt_tokens, enc, torch.device("cpu"))
    for a, b in zip(ours[:5], theirs[:5]):
        assert torch.equal(a, b)
    assert ours[5] == theirs[5]
    prompt_ids, prompt_mask, response, mask, logprobs, _ = ours
    assert 0 < (mask.sum(1) < mask.shape[1]).sum() < len(idx)             # some responses end early, some do not
    with torch.no_grad():
        logits, _ = minimal.lm_forward(lm, torch.cat([prompt_ids, response], 1),
                                       torch.cat([prompt_mask, torch.ones_like(response)], 1), prompt_ids.shape[1])
    torch.testing.assert_close(logprobs, minimal.token_logprobs(logits, response) * mask, atol=1e-5, rtol=1e-5)


def test_minimal_policy_computes_train_pys_logits_values_and_gradients():
    """minimal.py's PolicyWithValue and train.py's (model.add_value_head) on one network and one value head: the same
    logits and values of left-padded sequences, and the same gradient of every weight, the network's too, for a loss
    of both. The head's weights are random here: at 0, as both start, no gradient of the values reaches the network."""
    enc = data.task_encoding()
    lm = tiny_random_gpt(enc)
    ours = minimal.PolicyWithValue(copy.deepcopy(lm))
    theirs = model.add_value_head(copy.deepcopy(lm), enc.n_vocab, torch.device("cpu"))
    torch.nn.init.normal_(theirs.v_head.weight)
    ours.v_head.load_state_dict(theirs.v_head.state_dict())
    ids = torch.randint(enc.n_vocab, (4, 12))                            # (B, P + T), P = 5
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[3, :4] = 0                                        # left padding
    outputs, grads = [], []
    for policy in (ours, theirs):
        logits, values = policy(ids, mask, 5)                            # (B, T, V), (B, T)
        (minimal.token_logprobs(logits, ids[:, 5:]).sum() + values.pow(2).sum()).backward()
        outputs.append((logits, values))
        grads.append({name: p.grad for name, p in policy.named_parameters()})
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


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

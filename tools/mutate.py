"""
Mutation check: which realistic one-line bugs would the tests miss?

Each mutation replaces one snippet of one file in a temporary copy of the repository, then runs a fast
subset of the tests there (stopping at the first failure). A mutation is "caught" when a test fails,
"SURVIVED" when all pass. A snippet that is no longer found (exactly once) stops the script before
anything runs, so the list cannot rot silently: update it with the code.

Run:   python tools/mutate.py             (all mutations, 2 at a time, one thread each; a caught mutant
                                           takes 5-90 s, one that survives the fast tests also runs the
                                           end-to-end ones, a few minutes; all of them: about 30 minutes on 2 cores)
       python tools/mutate.py -k gae       (those whose name contains 'gae')
       python tools/mutate.py --list       (print the list)
       python tools/mutate.py --tests="rollout or update"   (only the tests matching this pytest -k)
The tests' pi_init is pre-trained once, in a shared folder (APA_TEST_SFT_DIR), not once per mutation.
"""
import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = ["test_losses.py", "tests/test_exact.py", "tests/test_grpo.py"]  # fast enough for one run per mutation, and enough

# the tests that guard a part of the program, for the mutations below that name them
UPDATE = "tests/test_exact.py::test_update_calls_the_loss_of_the_readme_table"
ROLLOUT = "tests/test_exact.py::test_rollout_against_slow_versions"
INIT_NEOX = "tests/test_models.py::test_init_trains_with_its_own_tokenizer_and_saves_a_loadable_policy[gpt_neox]"
TORCHRUN = "tests/test_ddp.py::test_torchrun_trains_checkpoints_and_resumes_after_a_kill"
RESUME_RULES = "tests/test_reliability.py::test_each_field_may_change_on_resume_or_is_refused"
REWARD_FAILURES = "tests/test_reliability.py::test_a_failing_reward_function_is_named_in_one_line"
REWARD_MODULE = "tests/test_reliability.py::test_a_reward_module_whose_import_fails_says_why"
NONSENSE = "tests/test_reliability.py::test_nonsense_is_refused_before_pre_training"
SAMPLE = "tests/test_reliability.py::test_sample_refuses_a_damaged_config_a_damaged_model_and_a_prompt_too_long"
LORA = "tests/test_models.py::test_lora_pi_init_is_the_untouched_model_and_training_starts_at_it"
STATIC = "tests/test_models.py::test_static_cache_sampler_draws_generates_tokens_and_its_logprobs_are_a_full_forward_pass"
NO_SYNC = "tests/test_models.py::test_decode_step_never_reads_a_tensor_on_the_host"
DRAW = "tests/test_models.py::test_sample_token_draws_what_multinomial_draws"
NOW = "tests/test_models.py::test_static_sampler_reads_the_weights_of_now_inside_one_autocast_block"
CASTS = "tests/test_models.py::test_static_steps_cast_each_weight_once_under_autocast"
HEAD = "tests/test_models.py::test_lm_head_on_the_response_alone_changes_no_logprob_and_skips_the_prompts_positions"
DRAWS = "tests/test_train.py::test_every_draw_of_a_run_uses_the_sampler_the_run_chose"
GUARD = "tests/test_exact.py::test_the_kl_guard_ends_the_whole_update"
LORA_LAYERS = "tests/test_models.py::test_lora_adapters_sit_on_every_linear_layer_of_gpt2_and_scale_by_alpha_over_r"
ESTIMATORS = "tests/test_grpo.py::test_kl_estimators_expected_gradients_on_the_policys_own_samples"
PPO_WHITENED = "test_losses.py::test_ppo_with_whitened_advantages_steps_by_grad_j_over_t_std_and_stops_only_at_optimum"
K1_IN_THE_LOSS = "tests/test_grpo.py::test_token_mdp_k1_in_the_loss_pulls_nowhere_and_the_policy_turns_deterministic"
PER_STATE_KL = ("tests/test_grpo.py::test_token_mdp_kl_estimators_expected_gradients_act_per_state_weighted_by_the_"
                "policys_visits")
PLACES_TOKEN = "tests/test_grpo.py::test_token_mdp_fixed_point_of_each_place_for_the_kl"
JSTAR = "tests/test_compare.py::test_a_run_handed_what_is_known_uses_it_and_trains_as_one_that_computes_it"
BAD_STEPS = "tests/test_train.py::test_bad_steps_are_skipped_and_only_enough_of_them_in_a_row_stop_the_run"
MAKE_POLICY = "tests/test_models.py::test_make_policy_builds_what_the_config_asks"
REWARD_MODEL_PY = "tests/test_reward_model.py"
MINIMAL_COPIES = "tests/test_minimal.py::test_the_copied_functions_are_their_originals_text"
MINIMAL_SAME = "tests/test_minimal.py::test_minimal_prints_the_numbers_of_train_py_for_the_default_config"
MINIMAL_PRETRAIN = "tests/test_minimal.py::test_minimal_pretrains_the_pi_init_that_train_py_caches"
DECODERS_TEST = ("tests/test_models.py::test_static_decoders_keep_the_two_last_used_and_a_graph_only_where_layers_keep_"
                 "no_python_state")
KL_NAME = "tests/test_grpo.py::test_grpo_loss_logs_its_kl_term_under_the_estimators_name"
NOT_ASKED = "tests/test_train.py::test_a_run_that_asks_for_no_jstar_and_no_exact_gap_ignores_what_it_is_handed"
SFT_THREADS = "tests/test_train.py::test_pre_training_keeps_torchs_threads_whatever_threads_says"
NO_VALUE_HEAD = "tests/test_train.py::test_grpo_and_rloo_train_no_value_head"
TWO_WRITERS = "tests/test_reliability.py::test_two_processes_writing_one_file_at_once_write_each_its_own"
ADDED_TOKENS = "tests/test_models.py::test_a_tokenizer_with_added_tokens_and_an_end_of_text_of_its_own"
REWARD_MODEL = "tests/test_models.py::test_a_reward_model_scores_with_its_own_tokenizer_and_pad_id_and_its_last_logit"
ENCODER_REWARD_MODEL = "tests/test_models.py::test_an_encoder_reward_model_whose_tokenizer_has_no_end_of_text"
REWARD_MODEL_NO_TOKENIZER = ("tests/test_models.py::test_a_reward_model_without_a_tokenizer_scores_the_policys_tokens_the_"
                             "last_that_fit")
HUB_ID = "tests/test_models.py::test_a_hub_id_brings_its_own_tokenizer_to_the_policy_and_the_reward_model"
HELD_OUT = "tests/test_train.py::test_the_held_out_evaluation_samples_the_held_out_prompts"
OWN_PROMPTS = "tests/test_train.py::test_prompts_of_your_own_have_no_held_out_prompts_unless_given"
SUMMARY = "tests/test_compare.py::test_the_summary_that_the_tables_are_built_from"
TABLES = "tests/test_compare.py::test_the_short_and_kl_tables_show_each_runs_own_summary"
PREDATES = "tests/test_reliability.py::test_a_checkpoint_that_predates_a_field_resumes_with_its_default_then"
SECOND_SWEEP = "tests/test_compare.py::test_a_second_sweep_in_the_same_out_dir_is_refused_before_any_work"
SAMPLE_N = "tests/test_reliability.py::test_sample_prints_as_many_completions_as_asked_the_task_prompts_in_turn"
PIPE = "tests/test_reliability.py::test_prompts_from_a_named_pipe_are_read_once"
SCORE_SHAPES = "tests/test_reliability.py::test_scores_are_one_number_a_completion_as_a_row_or_a_column"
EVALUATOR = "tests/test_judge.py::test_the_proxy_the_evaluator_and_the_judge_each_score_the_same_completions"
EVALUATOR_RUN = "tests/test_judge.py::test_a_run_with_an_evaluator_logs_the_proxy_the_evaluator_and_the_judge"
PAPER_TABLES = "tests/test_compare.py::test_the_paper_tables_show_each_runs_own_numbers_with_standard_errors"
PAPER_RUN = ("tests/test_compare.py::test_the_paper_setting_runs_every_algorithm_against_the_proxy_and_tabulates_its_"
             "metrics")
AUTHORS = ("test_losses.py::test_token_mdp_authors_configuration_is_the_paper_forms_fixed_point_for_s_lambda_or_"
           "collapses")
SAME_REWARDS = ["tests/test_train.py::test_same_rewards_judges_the_first_batch_of_all_processes",
                "tests/test_train.py::test_a_run_whose_rewards_are_all_equal_says_so_once"]
SMOLLM2_WEIGHTS = "tests/test_smollm2.py::test_the_folder_holds_the_gguf_files_weights_exactly"
VADER = "tests/test_smollm2.py::test_vader_reward_reads_real_text"

# the reward model and the judge (third pass)
RM = "tests/test_reward_model.py::test_"
HELD_OUT_STATS = RM + "held_out_stats_against_a_python_loop_and_the_slope_within_prompts_is_one_over_beta"
TASK_PAIRS = RM + "task_pairs_are_seeded_and_carry_their_true_rewards"
SPLIT = RM + "a_files_split_holds_out_a_share_of_its_distinct_pairs_and_no_training_pair"
PAD_AND_START = RM + "init_with_a_pad_and_a_start_token_of_its_own_trains_on_the_tokens_train_py_scores"
CLASSIFIER = RM + "the_classifier_starts_from_pi_inits_network_and_a_score_head_of_zero"
EVAL_GOLD = "tests/test_judge.py::test_the_held_out_evaluation_reports_the_judges_mean_each_response_against_its_prompt"
JUDGE_LOGGED = "tests/test_judge.py::test_the_judge_is_logged_and_never_trained_on"
JUDGE_EXACT = "tests/test_judge.py::test_exact_eval_reports_the_judge_and_the_loss_against_the_frontier"
FRONTIER_SPLIT = "tests/test_judge.py::test_the_frontier_is_the_best_split_of_the_kl_between_the_prompts"
FRONTIER_SCALE = "tests/test_judge.py::test_the_frontier_follows_the_judges_scale"
RM_TABLE = "tests/test_compare.py::test_the_rm_table_shows_each_column_from_its_own_key"
RM_PROMPTS = "tests/test_compare.py::test_the_rm_settings_held_out_prompts_are_held_out_openings"
RM_NONSENSE = "tests/test_compare.py::test_the_rm_settings_nonsense_is_one_line_before_any_work"
PAPER_DONE = "tests/test_compare.py::test_the_paper_tables_read_the_runs_that_are_done_and_evaluated"
BARRIERS = "tests/test_ddp.py::test_rank_zero_runs_its_block_first_and_finish_waits_for_rank_zero"
CMP = "tests/test_compare.py::test_"
FOLDERS = CMP + "each_run_has_a_folder_of_its_own_where_the_docs_say"
RUN_ONE = CMP + "a_run_trains_its_job_in_its_folder_resumes_its_checkpoint_and_a_diverged_run_is_done"
CURVES = CMP + "the_curves_draw_each_setting_once_the_mean_over_its_seeds_with_a_min_to_max_band"
RM_PAPER_JOBS = CMP + "the_rm_and_paper_settings_run_each_algorithm_at_each_lambda_or_lr_and_seed"
RM_SWEEP = CMP + "the_rm_setting_from_runs_done_draws_each_path_and_the_frontier_in_the_order_of_the_kl"
PAPER_SWEEP = CMP + "the_paper_setting_from_runs_done_names_each_reward_model_and_draws_the_held_out_scores"
SWEEP_LENGTHS = CMP + "the_sweep_tabulates_and_draws_each_setting_at_its_own_length"

# (name, file, original snippet, replacement[, tests]): each a bug someone could plausibly write; without
# tests of its own, a mutation runs TESTS
MUTATIONS = [
    # wiring of the loop (train.py, model.py, lab/exact.py)
    ("ref log-probs from the policy", "train.py",
     "ref_logits, _ = lm_forward(ref_lm, input_ids", "ref_logits, _ = lm_forward(policy.lm, input_ids"),
    ("default APA form handed ref_logprobs", "train.py",
     'ref = mb["ref_logprobs"] if cfg.apa_form != "exact" else None', 'ref = mb["ref_logprobs"]'),
    ("the authors' APA form anchored on pi_old", "train.py",
     'ref = mb["ref_logprobs"] if cfg.apa_form != "exact" else None',
     'ref = mb["ref_logprobs"] if cfg.apa_form == "paper" else None', [UPDATE]),
    ("APA advantages whitened in rollout", "train.py",
     'if cfg.algo == "ppo" or (cfg.algo == "apa" and cfg.apa_form == "authors"):\n            advantages = masked_whiten', 'if True:\n            advantages = masked_whiten'),
    ("PPO advantages not whitened", "train.py",
     'if cfg.algo == "ppo" or (cfg.algo == "apa" and cfg.apa_form == "authors"):\n            advantages = masked_whiten',
     'if cfg.algo == "apa" and cfg.apa_form == "authors":\n            advantages = masked_whiten'),
    ("the authors' APA form not whitened", "train.py",
     'if cfg.algo == "ppo" or (cfg.algo == "apa" and cfg.apa_form == "authors"):\n            advantages = masked_whiten', 'if cfg.algo == "ppo":\n            advantages = masked_whiten', [ROLLOUT]),
    ("paper form keeps the KL term in its reward", "train.py",
     'kl_coef = 0.0 if cfg.algo == "apa" and cfg.apa_form != "exact" else cfg.lam', "kl_coef = cfg.lam"),
    ("the authors' APA form keeps the KL term in its reward", "train.py",
     'kl_coef = 0.0 if cfg.algo == "apa" and cfg.apa_form != "exact" else cfg.lam',
     'kl_coef = 0.0 if cfg.algo == "apa" and cfg.apa_form == "paper" else cfg.lam', [ROLLOUT]),
    ("gamma and gae_lambda swapped in the call to gae", "train.py",
     "gae(rewards, values, mask, cfg.gamma, cfg.gae_lambda)", "gae(rewards, values, mask, cfg.gae_lambda, cfg.gamma)"),
    ("value clip around the returns (arguments swapped)", "train.py",
     'value_loss(values, mb["values"], mb["returns"]', 'value_loss(values, mb["returns"], mb["values"]'),
    ("value clip around the current values", "train.py",
     'value_loss(values, mb["values"], mb["returns"]', 'value_loss(values, values.detach(), mb["returns"]'),
    ("logged kl counts padding", "train.py",
     "kl = ((logprobs - ref_logprobs) * mask).sum(1)", "kl = (logprobs - ref_logprobs).sum(1)"),
    ("logged J adds the KL", "train.py",
     '"J": global_mean(scores - cfg.lam * seq_kl)', '"J": global_mean(scores + cfg.lam * seq_kl)',
     ["tests/test_train.py::test_training_runs_and_reward_improves"]),
    ("response mask stops before end-of-text", "model.py",
     "return (is_eot.cumsum(1) - is_eot == 0).float()", "return (is_eot.cumsum(1) == 0).float()"),
    ("position ids ignore left padding", "model.py",
     "return (mask.cumsum(-1) - 1).clamp(min=0)", "return torch.arange(mask.shape[1]).expand_as(mask)"),
    ("APA anchored on ref log-probs as old log-probs", "train.py",
     'apa_loss(logprobs, mb["logprobs"]', 'apa_loss(logprobs, mb["ref_logprobs"]'),
    ("exact J* without lambda", "lab/exact.py",
     "jstar = lam * torch.logsumexp(ref_logp + R / lam, 1)", "jstar = torch.logsumexp(ref_logp + R / lam, 1)"),
    # the shared machinery and the losses
    ("approx_kl log-ratio sign flipped", "ppo.py",
     "log_ratio = logprobs - old_logprobs", "log_ratio = old_logprobs - logprobs"),
    ("value clip around the returns", "ppo.py",
     "values_clipped = old_values + torch.clamp(values - old_values", "values_clipped = returns + torch.clamp(values - returns"),
    ("value loss min instead of max", "ppo.py",
     "torch.max(vf_loss1, vf_loss2)", "torch.min(vf_loss1, vf_loss2)"),
    ("PPO surrogate min instead of max", "ppo.py",
     "torch.max(pg_loss1, pg_loss2)", "torch.min(pg_loss1, pg_loss2)"),
    ("PPO ratio inverted", "ppo.py",
     "ratio = torch.exp(logprobs - old_logprobs)", "ratio = torch.exp(old_logprobs - logprobs)"),
    ("KL term zeroed", "ppo.py",
     "rewards = -kl_coef * (logprobs - ref_logprobs) * valid", "rewards = 0 * (logprobs - ref_logprobs) * valid"),
    ("KL term sign flipped", "ppo.py",
     "rewards = -kl_coef * (logprobs - ref_logprobs) * valid", "rewards = kl_coef * (logprobs - ref_logprobs) * valid"),
    ("score on the first token", "ppo.py",
     "last = valid.sum(1).long() - 1", "last = 0 * valid.sum(1).long()"),
    ("GAE without lambda", "ppo.py",
     "running = deltas[:, t] + gamma * gae_lambda * running", "running = deltas[:, t] + gamma * running"),
    ("GAE values not zeroed after the last token", "ppo.py",
     "values, rewards = values * valid, rewards * valid", "rewards = rewards * valid"),
    ("APA target sign", "apa.py", "step = advantages / lam if not clip", "step = -advantages / lam if not clip"),
    ("APA lambda -> 2 lambda", "apa.py", "step = advantages / lam if not clip", "step = advantages / (2 * lam) if not clip"),
    ("APA abs instead of square", "apa.py",
     "masked_mean((logprobs - target) ** 2, mask)", "masked_mean((logprobs - target).abs(), mask)"),
    ("AWR weight exp(-Adv/lambda')", "apa.py",
     "weights = torch.exp(advantages / awr_lam)", "weights = torch.exp(-advantages / awr_lam)"),
    ("AWR weight Adv * lambda'", "apa.py",
     "weights = torch.exp(advantages / awr_lam)", "weights = torch.exp(advantages * awr_lam)"),
    # the rest of the program: each with the tests that guard it (a fifth element)
    ("data parallel: loss not rescaled by the global token count", "train.py",
     "(loss * scale).backward()", "loss.backward()", ["tests/test_ddp.py"]),
    ("data parallel: whitening per process", "train.py",
     "masked_whiten(advantages, mask, mean_fn=global_mean)", "masked_whiten(advantages, mask)", ["tests/test_ddp.py"]),
    ("padded vocabulary not cut in the sampler", "model.py",
     "tok, logp = draw(vocab_logits(out.logits[:, -1], n_vocab), done, eot)",
     "tok, logp = draw(out.logits[:, -1].float(), done, eot)", ["tests/test_models.py"]),
    ("any boolean spelling read as true", "lab/cli.py",
     'if text.lower() in ("true", "1"):', 'if text.lower() not in ("false", "0"):', ["tests/test_cli.py"]),
    ("resume accepts a changed config", "lab/runs.py", "    if changed:\n", "    if False:\n",
     ["tests/test_reliability.py"]),
    ("a failed write leaves its temporary file", "lab/runs.py",
     "        elif os.path.exists(tmp):\n            os.remove(tmp)\n", "        elif False:\n            os.remove(tmp)\n",
     ["tests/test_reliability.py::test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint"]),
    ("checkpoint written in place, not renamed", "lab/runs.py",
     "        write(tmp)\n        os.replace(tmp, path)\n", "        write(path)\n",
     ["tests/test_reliability.py::test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint"]),
    ("a fresh run overwrites the earlier run", "lab/runs.py",
     "        keep_previous_run(cfg.out_dir)", "        pass", ["tests/test_train.py"]),
    # every algorithm's branch in rollout and update
    ("AWR falls through to PPO's loss", "train.py", 'if cfg.algo == "awr":', "if False:", [UPDATE]),
    ("AWR's weights use lambda, not awr_lam", "train.py",
     'mb["mask"], cfg.awr_lam,', 'mb["mask"], cfg.lam,', [UPDATE]),
    ("AWR's reward loses its KL penalty", "train.py",
     'kl_coef = 0.0 if cfg.algo == "apa" and cfg.apa_form != "exact" else cfg.lam',
     'kl_coef = 0.0 if cfg.algo == "awr" or (cfg.algo == "apa" and cfg.apa_form != "exact") else cfg.lam', [ROLLOUT]),
    ("AWR's advantages whitened like PPO's", "train.py",
     'if cfg.algo == "ppo" or (cfg.algo == "apa" and cfg.apa_form == "authors"):\n            advantages = masked_whiten',
     'if cfg.algo in ("ppo", "awr") or (cfg.algo == "apa" and cfg.apa_form == "authors"):\n'
     '            advantages = masked_whiten', [ROLLOUT]),
    ("logged entropy with its sign flipped", "model.py",
     "return -(logp.exp() * logp).sum(-1)", "return (logp.exp() * logp).sum(-1)", [ROLLOUT]),
    ("the policy scores the padded vocabulary", "model.py",
     "policy = PolicyWithValue(lm, n_vocab).to(device).eval()", "policy = PolicyWithValue(lm).to(device).eval()",
     [INIT_NEOX, MAKE_POLICY]),
    ("pi_init scores the padded vocabulary", "train.py",
     "lm_forward(ref_lm, input_ids, attention_mask, P, policy.n_vocab)", "lm_forward(ref_lm, input_ids, attention_mask, P)",
     [INIT_NEOX]),
    # data parallel: each process its own stream and its share of every minibatch
    ("processes seeded alike", "train.py",
     "torch.manual_seed(cfg.seed + rank())", "torch.manual_seed(cfg.seed)", [TORCHRUN]),
    ("each process takes the global minibatch size", "train.py",
     "split(cfg.minibatch_size // world_size())", "split(cfg.minibatch_size)", [TORCHRUN]),
    # the exact evaluator, resume rules, files and user code
    ("exact evaluator keeps the end-of-text token", "lab/exact.py",
     "enc.decode_batch([[a for a in r if a != eot] for r in responses])", "enc.decode_batch(responses)",
     ["tests/test_exact.py::test_exact_eval_matches_brute_force_enumeration"]),
    ("lam may change on resume", "lab/runs.py",
     'RESUME_MAY_CHANGE = {"iters",', 'RESUME_MAY_CHANGE = {"lam", "iters",', [RESUME_RULES]),
    ("Ctrl-C mid-write leaves the temporary file", "lab/runs.py", "        os.replace(tmp, path)\n    except BaseException:\n",
     "        os.replace(tmp, path)\n    except Exception:\n",
     ["tests/test_reliability.py::test_an_interrupted_atomic_write_leaves_no_temporary_file"]),
    ("one NaN among finite scores passes", "data.py",
     "if not torch.isfinite(scores).all():", "if not torch.isfinite(scores).any():", [REWARD_FAILURES]),
    ("sys.exit() in a reward function passes as success", "data.py",
     "    except (Exception, SystemExit) as e:                                 # sys.exit() in it is a failure too",
     "    except Exception as e:", [REWARD_FAILURES]),
    ("a failed import in a reward module reads 'not found'", "data.py",
     'if e.name != module.split(".")[0] and e.name != module:', "if False:", [REWARD_MODULE]),
    ("prompts keep a byte-order mark", "data.py", 'encoding="utf-8-sig"', 'encoding="utf-8"',
     ["tests/test_reliability.py::test_prompts_files_with_a_byte_order_mark_and_crlf_line_ends"]),
    ("an encoder with an LM head passes as causal", "lab/hf.py",
     '    check_causal(lm, f"{what} {path}")\n', "", [NONSENSE]),
    ("weights missing from a checkpoint pass", "lab/hf.py", 'if info["missing_keys"]:', "if False:", [NONSENSE]),
    ("--sample runs a prompt past the context window", "lab/runs.py",
     "check_fits(enc, prompt_tokens, run.max_new_tokens, lm.config)", "pass", [SAMPLE]),
    ("a damaged apa_config.json passes as a bare JSON error", "lab/runs.py",
     "except (ValueError, TypeError) as e:                                 # not JSON", "except TypeError as e:  #",
     [SAMPLE]),
    ("transformers' reports and bars reach the log", "lab/hf.py", "    hf_logging.set_verbosity_error()\n    hf_logging.disable_progress_bar()\n",
     "", ["tests/test_reliability.py::test_loading_reports_and_progress_bars_stay_out_of_the_log"]),
    # the KL guard, held-out evaluation, the learning rate of --init
    ("the KL guard never fires", "train.py", "if cfg.target_kl and kls[-1] > cfg.target_kl:", "if False:",
     ["tests/test_train.py::test_the_kl_guard_stops_a_runaway_update_and_says_so"]),
    ("the KL guard takes its step anyway", "train.py",
     'guard = {"kl_stop": kls[-1]}                             # every process alike: no more steps\n                break',
     'guard = {"kl_stop": kls[-1]}', [UPDATE]),
    ("held-out evaluation draws from the training stream", "evaluation.py",
     'with torch.random.fork_rng(devices=stream_devices(device)):', "if True:",
     ["tests/test_train.py::test_held_out_evaluation_is_logged_and_changes_no_training_number"]),
    ("held-out KL with its sign flipped", "evaluation.py",
     "kls.append(((logprobs - token_logprobs(ref_logits, response)) * mask).sum(1))",
     "kls.append(((token_logprobs(ref_logits, response) - logprobs) * mask).sum(1))",
     ["tests/test_exact.py::test_sampled_gap_and_jstar_agree_with_exact_and_exact_eval_uses_no_randomness"]),
    ("--init trains at the tiny task's lr", "train.py", "else 1e-6 if cfg.init else 3e-5,", "else 3e-5,",
     ["tests/test_cli.py", "tests/test_models.py::test_init_without_lr_trains_at_the_pretrained_default_and_says_so"]),
    # LoRA and activation checkpointing
    ("pi_init under LoRA keeps its adapters on", "lab/lora.py", "with self.lm.disable_adapter():",
     "with contextlib.nullcontext():", [LORA]),
    ("LoRA's adapters not merged into out/policy", "lab/runs.py", "            lm = lm.merge_and_unload()", "",
     [LORA]),
    ("checkpoints hold the frozen weights, not the adapters", "lab/runs.py",
     "policy.state_dict().items() if k not in skip}", "policy.state_dict().items() if k in skip}",
     ["tests/test_train.py::test_resume_after_sigkill_matches_uninterrupted_run"]),
    ("activation checkpointing left off in eval mode", "lab/lora.py",
     'if getattr(m, "gradient_checkpointing", False):\n            m.training = True',
     'if getattr(m, "gradient_checkpointing", False):\n            pass',
     ["tests/test_models.py::test_activation_checkpointing_recomputes_and_changes_no_gradient"]),
    ("LoRA leaves the LM head out (peft's all-linear)", "lab/lora.py",
     "(sorted({name.split(\".\")[-1] for name, m in lm.named_modules() if isinstance(m, (nn.Linear, Conv1D))})",
     "(\"all-linear\"",
     ["tests/test_exact.py::test_lora_reaches_the_optimum_too"]),
    ("a hub id goes to transformers' retries", "lab/checks.py", "            check_source(flag, path, tokenizer)", "            pass",
     ["tests/test_reliability.py::test_a_hub_id_that_cannot_be_had_is_one_line_at_once"]),
    # GRPO, RLOO and bounded APA (grpo.py, apa.py, their wiring in train.py, experiments/compare.py)
    ("GRPO's std without Bessel's correction", "grpo.py", "groups.std(1, keepdim=True)",
     "groups.std(1, keepdim=True, unbiased=False)", ["tests/test_grpo.py"]),
    ("GRPO's advantage: the mean not subtracted", "grpo.py", "adv = groups - groups.mean(1, keepdim=True)",
     "adv = groups + 0", ["tests/test_grpo.py"]),
    ("RLOO's baseline includes the response itself", "grpo.py",
     "others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)", "others = groups.mean(1, keepdim=True)",
     ["tests/test_grpo.py"]),
    ("GRPO's k3 replaced by the plain log-ratio (k1)", "grpo.py", "return log_r.exp() - log_r - 1", "return -log_r",
     ["tests/test_grpo.py"]),
    ("GRPO's KL term dropped", "grpo.py", "return pg_loss + lam * kl,", "return pg_loss,", ["tests/test_grpo.py"]),
    ("GRPO's KL term with its sign flipped", "grpo.py", "return pg_loss + lam * kl,", "return pg_loss - lam * kl,",
     ["tests/test_grpo.py"]),
    ("bounded APA: the bound ignored", "apa.py", "(advantages / lam).clamp(-clip, clip)", "(advantages / lam)",
     ["test_losses.py"]),
    ("bounded APA: bounded from above only", "apa.py", "(advantages / lam).clamp(-clip, clip)",
     "(advantages / lam).clamp(max=clip)", ["test_losses.py"]),
    ("bounded APA: c not passed to the loss", "train.py", "cfg.lam, ref, cfg.apa_clip)", "cfg.lam, ref)", [UPDATE]),
    ("GRPO falls through to PPO's loss (no KL term)", "train.py",
     '    if cfg.algo in CRITIC_FREE:',
     '    if cfg.algo == "grpo":\n        return ppo_policy_loss(logprobs, mb["logprobs"], mb["advantages"], mb["mask"], '
     'cfg.cliprange)\n    if cfg.algo in CRITIC_FREE:', [UPDATE]),
    ("the critic-free algorithms take GAE's advantages", "train.py",
     "    critic = cfg.algo not in CRITIC_FREE                                 # GRPO and RLOO have no use for values",
     "    critic = True", [ROLLOUT]),
    ("RLOO's reward without the KL", "train.py", 'score = scores - cfg.lam * seq_kl if cfg.kl == "reward" else scores',
     "score = scores", [ROLLOUT]),
    ("Dr. GRPO's flag ignored", "train.py", "group_advantages(score, k, cfg.grpo_std)", "group_advantages(score, k)",
     [ROLLOUT]),
    ("a group's prompts not consecutive", "train.py", ".repeat_interleave(k).tolist()", ".repeat(k).tolist()", [ROLLOUT]),
    ("k times the batch", "train.py", "(cfg.batch_size // world_size() // k,)", "(cfg.batch_size // world_size(),)",
     [ROLLOUT]),
    ("GRPO's default group of 1", "train.py", "else 4 if cfg.algo in CRITIC_FREE else 1,", "else 1,", [ROLLOUT]),
    # the theory's tests, each against the one test that pins it (a weaker test would pass these)
    ("the paper form's fixed point: lambda -> 2 lambda", "apa.py", "step = advantages / lam if not clip",
     "step = advantages / (2 * lam) if not clip", ["test_losses.py::test_token_mdp_paper_form_misses_optimum"]),
    ("bounded APA: the clip at 2c", "apa.py", "(advantages / lam).clamp(-clip, clip)",
     "(advantages / lam).clamp(-2 * clip, 2 * clip)",
     ["test_losses.py::test_bounded_apa_target_moves_each_log_prob_by_the_clipped_advantage"]),
    ("whitening divides by the variance, not the std", "ppo.py", "(x - mean) * torch.rsqrt(var + eps)",
     "(x - mean) / (var + eps)",
     ["test_losses.py::test_bandit_whitened_advantages_keep_the_default_fixed_point_and_only_rescale_the_step"]),
    ("RLOO's baseline includes the response itself (its gradient)", "grpo.py",
     "others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)", "others = groups.mean(1, keepdim=True)",
     ["tests/test_grpo.py::test_bandit_rloo_gradient_is_grad_j_and_what_matters_is_the_kl_in_its_reward"]),
    ("GRPO's std without Bessel's correction (the per-state tilt)", "grpo.py", "groups.std(1, keepdim=True)",
     "groups.std(1, keepdim=True, unbiased=False)",
     ["tests/test_grpo.py::test_token_mdp_grpo_fixed_point_is_the_per_state_tilt_by_the_expected_group_advantage"]),
    ("GRPO's KL weight doubled (the gradient at pi*)", "grpo.py", "return pg_loss + lam * kl,",
     "return pg_loss + 2 * lam * kl,",
     ["tests/test_grpo.py::test_token_mdp_expected_gradient_at_pi_star_is_zero_only_for_rloo"]),
    # the LM head at the response's positions alone (model.py), the default on a GPU
    ("the head cut on a CPU too", "model.py", 'prompt_logits = input_ids.device.type == "cpu"',
     'prompt_logits = input_ids.device.type == "cuda"', [HEAD]),
    ("the head keeps one position too few", "model.py", 'else T + 1)', 'else T)', [HEAD]),
    ("the head cut never taken", "model.py", "logits_to_keep=0 if prompt_logits else", "logits_to_keep=0 if True else",
     [HEAD]),
    ("the response's states from the prompt's end", "model.py", "response_states = slice(-T - 1, -1)",
     "response_states = slice(-T, None)"),
    # the sampler: its draw (model.py), the static cache's decoder (lab/static_sampler.py); the CUDA graph itself is
    # tested where CUDA is
    ("the draw from uniform noise, not exponential", "model.py", "torch.empty_like(probs).exponential_()",
     "torch.empty_like(probs).uniform_()", [DRAW]),
    ("activation checkpointing on while sampling", "model.py", "    with checkpointing_off(lm):\n        attn = prompt_mask",
     "    if True:\n        attn = prompt_mask",
     ["tests/test_models.py::test_activation_checkpointing_changes_no_sampled_token"]),
    ("the sampler: greedy instead of a draw", "model.py",
     "tok = torch.where(done, eot, sample_token(logp.exp()))", "tok = torch.where(done, eot, logp.argmax(-1))"),
    ("the sampler: finished rows not padded", "model.py",
     "tok = torch.where(done, eot, sample_token(logp.exp()))", "tok = sample_token(logp.exp())"),
    ("static decoder: position ids not advanced", "lab/static_sampler.py", "self.pos.add_(1).clamp_(", "self.pos.add_(0).clamp_(",
     [STATIC]),
    ("static decoder: the first response position is the last prompt's", "lab/static_sampler.py",
     "self.pos.copy_(pos[:, -1:] + 1)", "self.pos.copy_(pos[:, -1:])", [STATIC]),
    ("static decoder: prompts padded on the right", "lab/static_sampler.py",
     "F.pad(prompt_ids, (pad, 0), value=eot), F.pad(prompt_mask, (pad, 0))",
     "F.pad(prompt_ids, (0, pad), value=eot), F.pad(prompt_mask, (0, pad))", [STATIC]),
    ("static decoder: the cache not reset for the next call", "lab/static_sampler.py", "        self.cache.reset()", "        pass",
     [STATIC]),
    ("static decoder: stops once any row has ended", "lab/static_sampler.py", "if dec.done.all():", "if dec.done.any():", [STATIC]),
    ("static decoder: the length of the steps run, not of the longest response", "lab/static_sampler.py",
     "n = int(mask.sum(1).max())", "n = t + 1", [STATIC]),
    ("static decoder: the caller's autocast cache read (stale weights)", "lab/static_sampler.py",
     "    torch.clear_autocast_cache()\n    try:", "    try:",
     [NOW]),
    ("static decoder: its cast copies left in the caller's autocast block", "lab/static_sampler.py",
     "    finally:\n        torch.clear_autocast_cache()", "    finally:\n        pass",
     [NOW]),
    ("static decoder: each weight cast at every step", "lab/static_sampler.py", "cache_enabled=True):", "cache_enabled=False):",
     [CASTS]),
    ("static decoder: the last replay's tokens past max_new_tokens kept", "lab/static_sampler.py",
     "response_mask(dec.tokens[:, :min(t, T)], eot)", "response_mask(dec.tokens[:, :t], eot)", [STATIC]),
    ("static decoder: buffers of max_new_tokens, not a multiple of the steps per replay", "lab/static_sampler.py",
     "StaticDecoder(lm, B, P, -(-T // k) * k,", "StaticDecoder(lm, B, P, T,", [STATIC]),
    ("static decoder: positions past the context window in the dropped steps", "lab/static_sampler.py",
     "self.pos.add_(1).clamp_(max=self.last_pos)", "self.pos.add_(1)",
     ["tests/test_models.py::test_static_sampler_reaches_the_end_of_the_context_window"]),
    ("static decoder: a graph for every model", "lab/static_sampler.py", "self.graphable = (all(", "self.graphable = True or (all(",
     [DECODERS_TEST]),
    ("static decoders: the first built, not the least recently used, leaves", "lab/static_sampler.py",
     "    dec = DECODERS.pop(key, None) or StaticDecoder(lm, B, P, -(-T // k) * k, eot, n_vocab, device)\n",
     "    dec = DECODERS.get(key) or StaticDecoder(lm, B, P, -(-T // k) * k, eot, n_vocab, device)\n    if key in DECODERS:\n"
     "        return dec\n", [DECODERS_TEST]),
    ("static decoder: the step counter advanced on the host", "lab/static_sampler.py", "        self.t += 1\n",
     "        self.t.fill_(self.t.item() + 1)\n", [NO_SYNC]),
    # the seams between the algorithm and lab/: the sampler a run chose, J* handed over, the run folder
    ("--cuda_graph=0 ignored on a GPU", "lab/static_sampler.py", "if cfg.cuda_graph and device.type == \"cuda\"",
     "if device.type == \"cuda\"", ["tests/test_models.py::test_a_run_samples_with_the_cuda_graph_on_a_gpu_only_with_cuda_graph_1"]),
    ("the rollout samples with the eager loop whatever the run chose", "train.py",
     "    return functools.partial(sample, cfg, enc=enc, device=device, generate=generate)",
     "    return functools.partial(sample, cfg, enc=enc, device=device)", [DRAWS]),
    ("the held-out evaluation samples with the eager loop whatever the run chose", "train.py",
     "eval_prompts, reward_fn, sampler, it, gold_fn,",
     "eval_prompts, reward_fn, functools.partial(sample, cfg, enc=enc, device=device), it, gold_fn,", [DRAWS]),
    ("J* handed to train.train is estimated again", "train.py", 'if cfg.jstar_samples and "jstar" not in known:',
     "if cfg.jstar_samples:", [JSTAR]),
    ("the exact responses handed to train.train are computed again", "train.py",
     'if cfg.exact_every and "space" not in known:', "if cfg.exact_every:", [JSTAR]),
    ("experiments/compare.py: J* shared across lambdas", "experiments/compare.py", '"eval_prompts", "eval_every", "eval_samples", "apa_clip"',
     '"eval_prompts", "eval_every", "eval_samples", "lam", "apa_clip"', ["tests/test_compare.py"]),
    ("a resumed run starts again at iteration 0", "lab/runs.py", "    return state[\"iter\"]\n", "    return 0\n",
     ["tests/test_train.py::test_resume_after_sigkill_matches_uninterrupted_run"]),
    # the KL guard, the held-out evaluation, LoRA, bf16, the value clip, the plot's labels: each once missed by the tests
    ("bounded APA's clipfrac from |Adv|, not |Adv/lambda|", "apa.py", "((advantages / lam).abs() > clip)",
     "(advantages.abs() > clip)", ["test_losses.py::test_bounded_apa_target_moves_each_log_prob_by_the_clipped_advantage"]),
    ("the KL guard ends only the current epoch", "train.py", "        if guard:\n            break\n", "", [GUARD]),
    ("the KL guard skips one minibatch instead of stopping", "train.py",
     'guard = {"kl_stop": kls[-1]}                             # every process alike: no more steps\n                break',
     'guard = {"kl_stop": kls[-1]}\n                continue', [GUARD]),
    ("the KL guard on this process's approx_kl, not all processes'", "train.py",
     'kls.append(mb_stats["approx_kl"])', 'kls.append(pg_stats["approx_kl"])', ["tests/test_ddp.py"]),
    ("the held-out evaluation on the training openings", "data.py", "else [] if cfg.prompts else task_eval_prompts())",
     "else [] if cfg.prompts else task_prompts())",
     ["tests/test_train.py::test_the_held_out_evaluation_samples_the_held_out_prompts"]),
    ("--lora_alpha ignored", "lab/lora.py", "lora_alpha=cfg.lora_alpha", "lora_alpha=cfg.lora_r", [LORA_LAYERS]),
    ("--lora_targets=all misses GPT-2's Conv1D layers", "lab/lora.py", "isinstance(m, (nn.Linear, Conv1D))",
     "isinstance(m, nn.Linear)", [LORA_LAYERS]),
    ("a bf16 run stores an fp32 pi_init in bf16, rounding it", "lab/lora.py",
     "elif bf16(cfg, device) and exact_in_bf16(ref_lm):", "elif bf16(cfg, device):",
     ["tests/test_models.py::test_frozen_pi_init_is_stored_in_bf16_only_where_that_rounds_nothing"]),
    ("the held-out evaluation draws from the GPU's training stream", "evaluation.py",
     'return [device] if device.type == "cuda" else []', "return []",
     ["tests/test_train.py::test_the_held_out_evaluation_forks_the_random_stream_of_the_gpu_it_samples_on"]),
    ("the rollout's forward pass outside autocast", "train.py",
     "    with autocast(cfg, device):\n        logits, values = policy(input_ids, attention_mask, P, critic)",
     "    with torch.no_grad():\n        logits, values = policy(input_ids, attention_mask, P, critic)",
     ["tests/test_models.py::test_bf16_run_trains_and_starts_at_ratio_one"]),
    ("a LoRA checkpoint holds the frozen weight tied to the LM head", "lab/runs.py",
     "policy.named_parameters(remove_duplicate=False)", "policy.named_parameters()",
     ["tests/test_train.py::test_a_lora_checkpoint_holds_only_what_trains"]),
    ("--lora_r without peft found out after pre-training", "lab/checks.py",
     "    if cfg.lora_r:                                                      # an optional extra",
     "    if False:  #", ["tests/test_reliability.py::test_lora_without_peft_is_refused_before_pre_training"]),
    ("the guard's note counts one epoch's steps", "lab/cli.py",
     "f\"{cfg.epochs * (cfg.batch_size // cfg.minibatch_size)} steps\"", "f\"{cfg.batch_size // cfg.minibatch_size} steps\"",
     ["tests/test_train.py::test_the_kl_guard_stops_a_runaway_update_and_says_so"]),
    ("experiments/compare.py's own place for RLOO's KL: k3", "experiments/compare.py", '"rloo": "reward"}  # their own',
     '"rloo": "k3"}  # their own', ["tests/test_compare.py::test_the_kl_tables_own_places_are_train_pys_defaults"]),
    ("experiments/compare.py --plot names every GRPO run k = 4", "experiments/compare.py",
     'conf.get("group_size", defaults["group_size"])', "4",
     ["tests/test_compare.py::test_plot_labels_a_run_with_its_own_group_size"]),
    ("PPO's value clip centred on 0, not on the rollout's values", "ppo.py",
     "values_clipped = old_values + torch.clamp(values - old_values", "values_clipped = 0 + torch.clamp(values - 0",
     ["test_losses.py::test_value_loss_clips_around_old_values"]),
    ("the tiny GPT at torch's default threads on a CPU", "model.py", "(cfg.threads or not cfg.init)", "cfg.threads",
     ["tests/test_models.py::test_the_cpu_threads_of_a_run"]),
    # where GRPO's and RLOO's KL goes (--kl), and their estimators
    ("GRPO's advantages from R - lambda KL whatever --kl says", "train.py",
     'score = scores - cfg.lam * seq_kl if cfg.kl == "reward" else scores', "score = scores - cfg.lam * seq_kl", [ROLLOUT]),
    ("RLOO's KL in the loss ignored", "train.py",
     '                         cfg.cliprange, kl_in_loss)',
     '                         cfg.cliprange, kl_in_loss if cfg.algo == "grpo" else None)', [UPDATE]),
    ("--kl's estimator ignored: always k3", "train.py", "kl_in_loss = KL_ESTIMATORS.get(cfg.kl)",
     'kl_in_loss = KL_ESTIMATORS.get(cfg.kl) and KL_ESTIMATORS["k3"]', [UPDATE]),
    ("RLOO's own place for the KL: k3 in the loss", "train.py", '{"grpo": "k3", "rloo": "reward"}',
     '{"grpo": "k3", "rloo": "k3"}', [ROLLOUT]),
    ("GRPO's own place for the KL: the reward", "train.py", '{"grpo": "k3", "rloo": "reward"}',
     '{"grpo": "reward", "rloo": "reward"}', [ROLLOUT]),
    ("k2 without its half", "grpo.py", "return 0.5 * (logprobs - ref_logprobs) ** 2", "return (logprobs - ref_logprobs) ** 2",
     [ESTIMATORS]),
    ("k3 x ratio without the ratio's gradient", "grpo.py", "return torch.exp(logprobs - old_logprobs) * k3(",
     "return torch.exp(logprobs - old_logprobs).detach() * k3(", [ESTIMATORS]),
    ("k1 as k3: the forward KL's gradient", "grpo.py", "    return logprobs - ref_logprobs                               # (B, T)",
     "    return k3(logprobs, ref_logprobs)", [ESTIMATORS]),
    ("experiments/compare.py: the guard row without its guard", "experiments/compare.py", "**(QUICK if cfg.quick else {})), **ALGOS[algo])",
     "**(QUICK if cfg.quick else {}), **{k: v for k, v in ALGOS[algo].items() if k != 'target_kl'}))",
     ["tests/test_compare.py::test_each_run_is_its_algorithm_and_only_the_guard_row_has_the_guard"]),
    # the core on its own: each loss file's own helpers, the seams that train.py wires to lab/
    ("apa.py's approx_kl with its log-ratio flipped", "apa.py",
     "    log_ratio = logprobs - old_logprobs                          # (B, T)  log r_t",
     "    log_ratio = old_logprobs - logprobs                          # (B, T)  log r_t"),
    ("apa.py's masked mean unweighted", "apa.py", "    return (x * mask).sum() / mask.sum()", "    return x.mean()"),
    ("grpo.py's approx_kl with its log-ratio flipped", "grpo.py", "log_ratio = (logprobs - old_logprobs).detach()",
     "log_ratio = (old_logprobs - logprobs).detach()", ["tests/test_layout.py"]),
    ("grpo.py's masked mean unweighted", "grpo.py", "    return (x * mask).sum() / mask.sum()", "    return x.mean()"),
    ("the rollout scores the completions against other prompts", "train.py",
     "scores = call_reward(cfg, reward_fn, batch_prompts, completions)",
     "scores = call_reward(cfg, reward_fn, prompts[:len(idx)], completions)",
     [ROLLOUT, "tests/test_judge.py::test_the_judge_is_logged_and_never_trained_on"]),
    ("the rollout logs the proxy's score as the evaluator's", "train.py",
     '"evaluator": global_mean(evaluator).item()', '"evaluator": global_mean(scores).item()', [EVALUATOR]),
    ("the held-out evaluation scores with the proxy in place of the evaluator", "evaluation.py",
     "evals.append(call_reward(cfg, evaluator_fn,", "evals.append(call_reward(cfg, reward_fn,", [EVALUATOR]),
    ("--evaluator loads the proxy's reward model", "train.py", "hf.reward_model_fn(cfg.evaluator, enc, device)",
     "hf.reward_model_fn(cfg.reward_model, enc, device)", [EVALUATOR_RUN]),
    ("the held-out evaluation is handed no evaluator", "train.py",
     "sampler, it, gold_fn,\n                             evaluator_fn)", "sampler, it, gold_fn)", [EVALUATOR_RUN]),
    ("a finite step does not start the bad-step count again", "lab/checks.py",
     "            self.in_a_row = 0\n            return False", "            return False", [BAD_STEPS]),
    ("data parallel: the loss's scale without the number of processes", "lab/ddp.py", "n * world_size() / N", "n / N",
     ["tests/test_ddp.py"]),
    ("--grad_checkpointing ignored", "lab/lora.py", "    if cfg.grad_checkpointing:\n        checkpoint_activations",
     "    if False:\n        checkpoint_activations", [MAKE_POLICY]),
    ("the critic-free algorithms' value head trains", "model.py", "policy.v_head.requires_grad_(critic)",
     "policy.v_head.requires_grad_(True)", [UPDATE, MAKE_POLICY]),
    ("--init's own tokenizer ignored", "lab/hf.py", 'cfg.init if ships_tokenizer(cfg.init) else "gpt2"', '"gpt2"',
     [INIT_NEOX]),
    # the reward model (reward_model.py): the Bradley-Terry loss, the simulated annotator, where the reward is read
    ("Bradley-Terry: the margin's sign flipped", "reward_model.py", "margin = chosen_rewards - rejected_rewards",
     "margin = rejected_rewards - chosen_rewards", [REWARD_MODEL_PY]),
    ("Bradley-Terry without the log", "reward_model.py", "loss = -F.logsigmoid(margin).mean()",
     "loss = -torch.sigmoid(margin).mean()", [REWARD_MODEL_PY]),
    ("the reward read at the first token, not the last real one", "reward_model.py",
     "hidden[torch.arange(len(ids), device=device), last]", "hidden[:, 0]", [REWARD_MODEL_PY]),
    ("the annotator's labels not drawn: always the better response", "reward_model.py",
     "return torch.rand(p.shape) < p", "return 0.5 < p", [REWARD_MODEL_PY]),
    ("the annotator's beta ignored", "reward_model.py", "p = torch.sigmoid((rewards1 - rewards2) / beta)",
     "p = torch.sigmoid(rewards1 - rewards2)", [REWARD_MODEL_PY]),
    ("the task's pairs: chosen and rejected swapped, their true rewards not", "reward_model.py",
     "((y1, y2) if first[k] else (y2, y1))", "((y2, y1) if first[k] else (y1, y2))", [REWARD_MODEL_PY]),
    # the reward model, third pass: each bug that passed the suite, against the test that now catches it
    ("Bradley-Terry's accuracy counts a tie as ordered right", "reward_model.py",
     '"accuracy": (margin > 0)', '"accuracy": (margin >= 0)', [RM + "bradley_terry_loss_against_a_python_loop"]),
    ("the held-out accuracy counts a tie as ordered right", "reward_model.py",
     '"accuracy": (r[:, 0] > r[:, 1])', '"accuracy": (r[:, 0] >= r[:, 1])', [HELD_OUT_STATS]),
    ("the accuracy against R counts a tie of r as agreeing", "reward_model.py",
     "agree = torch.sign(r[:, 0] - r[:, 1]) == torch.sign(true[:, 0] - true[:, 1])",
     "agree = (r[:, 0] > r[:, 1]) == (true[:, 0] > true[:, 1])", [HELD_OUT_STATS]),
    ("the slope regresses R on r", "reward_model.py", "/ (true_c ** 2).sum()).item()", "/ (r_c ** 2).sum()).item()",
     [HELD_OUT_STATS]),
    ("the slope's sign flipped", "reward_model.py", 'stats["slope"] = ((r_c * true_c).sum()',
     'stats["slope"] = (-(r_c * true_c).sum()', [HELD_OUT_STATS]),
    ("the slope pooled over prompts", "reward_model.py",
     "group = torch.tensor(np.unique(prompts, return_inverse=True)[1]).repeat_interleave(2)",
     "group = torch.zeros(2 * len(r), dtype=torch.long)", [HELD_OUT_STATS]),
    ("spearman of a NaN a number", "reward_model.py",
     "    if not (np.isfinite(x).all() and np.isfinite(y).all()):\n        return math.nan\n", "",
     [RM + "spearman_of_a_value_that_is_not_finite_is_nan"]),
    ("the annotator at beta squared", "reward_model.py", "first = annotate(true[:, 0], true[:, 1], cfg.beta)",
     "first = annotate(true[:, 0] / cfg.beta, true[:, 1] / cfg.beta, cfg.beta)", [TASK_PAIRS]),
    ("a pair's two responses answer two prompts", "reward_model.py",
     "idx = torch.randint(len(prompts), (n,)).repeat_interleave(2).tolist()",
     "idx = torch.randint(len(prompts), (2 * n,)).tolist()", [RM + "the_two_responses_of_a_pair_answer_its_prompt"]),
    ("the held-out pairs drawn on the training prompts", "reward_model.py",
     "task_pairs(cfg, lm, enc, eval_prompts, n_eval, device)", "task_pairs(cfg, lm, enc, prompts, n_eval, device)",
     [RM + "the_held_out_pairs_are_drawn_on_the_held_out_prompts"]),
    ("a file's held-out split overlaps its training split by one pair", "reward_model.py",
     "train = {distinct[i] for i in order[n_eval:]}", "train = {distinct[i] for i in order[n_eval - 1:]}", [SPLIT]),
    ("a file's split on lines, not distinct pairs", "reward_model.py",
     "keys = [tuple(pair[:3]) for pair in pairs]", "keys = [tuple(pair) for pair in pairs]", [SPLIT]),
    ("a file of one repeated pair accepted", "reward_model.py", "        if distinct < 2:", "        if distinct < 1:",
     [SPLIT]),
    ("the reward model pads with end-of-text though its tokenizer has a pad token", "reward_model.py",
     "pad_id = enc.tok.pad_token_id if isinstance(enc, HFTokenizer) else enc.eot_token", "pad_id = enc.eot_token",
     [PAD_AND_START]),
    ("training texts encoded without the tokenizer's special tokens", "reward_model.py",
     'return enc.tok(text, truncation=bool(context), max_length=context)["input_ids"]',
     'return enc.tok(text, truncation=bool(context), max_length=context, add_special_tokens=False)["input_ids"]',
     [PAD_AND_START]),
    ("a long text keeps its first tokens in training", "reward_model.py",
     "return enc.encode_ordinary(text)[-context:] if context", "return enc.encode_ordinary(text)[:context] if context",
     [RM + "a_text_longer_than_the_context_is_read_as_train_py_reads_it"]),
    ("a Hugging Face tokenizer cuts long texts on the right", "reward_model.py",
     'enc.tok.padding_side, enc.tok.truncation_side = "right", "left"',
     'enc.tok.padding_side, enc.tok.truncation_side = "right", "right"', [PAD_AND_START]),
    ("pi_init's weights never reach the classifier", "reward_model.py",
     "rm.base_model.load_state_dict(lm.base_model.state_dict())", "rm.base_model.load_state_dict(rm.base_model.state_dict())",
     [CLASSIFIER]),
    ("the score head starts from the LM head's row", "reward_model.py", "nn.init.zeros_(rm.score.weight)",
     "rm.score.weight.data.copy_(lm.get_output_embeddings().weight[pad_id][None])", [CLASSIFIER]),
    ("the reward model's learning rate not decayed", "reward_model.py", 'g["lr"] = cfg.lr * (1 - step / steps)',
     'g["lr"] = cfg.lr', [RM + "the_learning_rate_decays_linearly_to_zero_over_every_step_the_last_partial_batch_included"]),
    ("the reward model's gradients not clipped", "reward_model.py",
     "nn.utils.clip_grad_norm_(rm.parameters(), cfg.max_grad_norm)", "nn.utils.clip_grad_norm_(rm.parameters(), math.inf)",
     [RM + "gradients_are_clipped_to_max_grad_norm"]),
    ("the reward model's steps counted by floor division", "reward_model.py",
     "steps = cfg.epochs * -(-len(train_tokens) // cfg.batch_size)", "steps = cfg.epochs * (len(train_tokens) // cfg.batch_size)",
     [RM + "the_learning_rate_decays_linearly_to_zero_over_every_step_the_last_partial_batch_included"]),
    ("the held-out eval_gold is the proxy's mean", "evaluation.py", '{"eval_gold": torch.cat(golds).mean().item()}',
     '{"eval_gold": scores.mean().item()}', [EVAL_GOLD]),
    ("the held-out judge scores against the first prompt", "evaluation.py",
     "golds.append(call_reward(cfg, gold_fn, [eval_prompts[i] for i in idx], completions,",
     "golds.append(call_reward(cfg, gold_fn, [eval_prompts[idx[0]]] * len(idx), completions,", [EVAL_GOLD]),
    ("the rollout's judge scores against the first prompt", "train.py",
     "gold = (call_reward(cfg, gold_fn, batch_prompts, completions,",
     "gold = (call_reward(cfg, gold_fn, [batch_prompts[0]] * len(completions), completions,", [JUDGE_LOGGED]),
    ("the exact judge scores against the first prompt", "lab/exact.py",
     "golds.append(call_reward(cfg, gold_fn, [prompt] * len(completions), completions,",
     "golds.append(call_reward(cfg, gold_fn, [prompts[0]] * len(completions), completions,", [JUDGE_EXACT]),
    ("the frontier matched prompt by prompt", "lab/exact.py", "    return tilt(math.exp(hi))[0], math.exp(hi)",
     "    return (sum(frontier(ref_logp[i:i + 1], G[i:i + 1], kl)[0] for i in range(len(G))) / len(G) if len(G) > 1 "
     "else tilt(math.exp(hi))[0]), math.exp(hi)", [FRONTIER_SPLIT]),
    ("the frontier's bracket fixed at [1e-4, 1e8]", "lab/exact.py",
     "    lo = hi = scale\n    while tilt(math.exp(lo))[1] < kl and lo > scale - 600:               # KL rises to kl_best as lambda' falls\n        lo -= 2\n",
     "    lo, hi = math.log(1e-4), math.log(1e8)\n", [FRONTIER_SCALE]),
    ("the frontier past the best responses' KL: a tilt at 1e-4", "lab/exact.py",
     "        return best.mean().item(), 0.0", "        return tilt(1e-4)[0], 1e-4", [FRONTIER_SCALE]),
    ("the rm table's judge column shows the proxy", "experiments/compare.py", "{cell('gold_exact', '.3f')}",
     "{cell('reward_exact', '.3f')}", [RM_TABLE]),
    ("the rm setting's held-out prompts are training openings", "experiments/compare.py",
     "data.task_eval_prompts()[::5][:n]", "data.task_prompts()[1::5][:n]", [RM_PROMPTS]),
    # the reward model's guards, third pass: nothing lost, nonsense refused, messages that name the right thing
    ("the earlier reward model removed before the new one is written", "lab/runs.py",
     "    remove_stale(path)\n    tmp = path +", "    shutil.rmtree(path, ignore_errors=True)\n    tmp = path +",
     [RM + "a_folder_replaced_and_interrupted_at_any_moment_is_the_old_or_the_new_one_whole"]),
    ("a killed save's temporary folder never removed", "lab/runs.py", "    remove_stale(path)\n    tmp = path +",
     "    tmp = path +", [RM + "a_save_killed_leaves_one_model_whole_and_the_next_save_removes_what_it_left"]),
    ("the fallback's second rename not undone", "lab/runs.py",
     "            except BaseException:\n                os.replace(old, path)\n",
     "            except BaseException:\n                pass\n", [RM + "a_folder_replaced_and_interrupted_at_any_moment_is_the_old_or_the_new_one_whole"]),
    ("any metrics.json taken for a reward model", "reward_model.py",
     'return {"preferences", "pairs", "beta", "held_out"} <= config.keys()', "return True",
     [RM + "a_folder_that_is_not_this_scripts_reward_model_is_never_replaced"]),
    ("a reward model's folder with a file of yours taken as one", "reward_model.py",
     "    if any(name not in SAVED and", "    if False and any(name not in SAVED and",
     [RM + "a_folder_that_is_not_this_scripts_reward_model_is_never_replaced"]),
    ("two reward_model.py runs on one out_dir", "reward_model.py", "with runs.exclusive(cfg.out_dir):",
     "with runs.exclusive(cfg.sft_dir):", [RM + "two_runs_on_one_out_dir_are_stopped_at_a_lock"]),
    ("reward_model.py's lr unbounded", "reward_model.py", '("lr", 0 <= cfg.lr <= 0.1,', '("lr", 0 <= cfg.lr,',
     [RM + "nonsense_is_refused_before_any_work_in_one_line_naming_it"]),
    ("reward_model.py holding out every pair", "reward_model.py", "cfg.preferences or n_eval < cfg.pairs,",
     "cfg.preferences or n_eval <= cfg.pairs,", [RM + "nonsense_is_refused_before_any_work_in_one_line_naming_it"]),
    ("reward_model.py's threads unbounded", "reward_model.py", '("threads", 0 <= cfg.threads <= most_threads,',
     '("threads", 0 <= cfg.threads,', [RM + "nonsense_is_refused_before_any_work_in_one_line_naming_it"]),
    ("an out_dir that is a file found after training", "reward_model.py",
     "if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):", "if False:",
     [RM + "an_out_dir_that_is_a_file_or_under_one_is_named_before_any_work"]),
    ("a read-only out_dir found after training", "reward_model.py",
     "if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):", "if not os.path.isdir(parent):",
     [RM + "a_read_only_out_dir_is_named_before_any_work"]),
    ("a resume against a reward model trained again", "lab/runs.py",
     'if state.get("reward_model_fingerprint", now) != now:', "if False:", [RM + "a_resume_after_the_reward_model_changed_is_refused"]),
    ("the reward model's fingerprint: the sizes alone", "lab/runs.py", "|{st.st_size}|{st.st_mtime_ns}",
     "|{st.st_size}", [RM + "a_resume_after_the_reward_model_changed_is_refused"]),
    ("the judge's failure to load called a reward function", "train.py",
     'load_reward_fn(cfg.gold_fn, "gold function")', "load_reward_fn(cfg.gold_fn)", [RM + "messages_name_the_gold_function_and_both_sizes_of_a_vocabulary_too_small"]),
    ("a reward model's vocabulary too small: an IndexError", "lab/hf.py", "if rows is not None and rows < n_tokens:",
     "if rows is not None and rows < 0:", [RM + "messages_name_the_gold_function_and_both_sizes_of_a_vocabulary_too_small"]),
    ("the rm setting's lambdas may be 0 or negative", "experiments/compare.py", "ok = 0 < float(item) < math.inf",
     "ok = float(item) < math.inf", [RM_NONSENSE]),
    ("the rm setting's --run=0 with nothing done trains a reward model", "experiments/compare.py",
     'if not cfg.run and not os.path.exists(os.path.join(rm_folder(cfg), "reward_model", "metrics.json")):',
     "if False:", [RM_NONSENSE]),
    ("bench --reward_model with no rounds", "experiments/bench.py", "args.rounds >= 1 or not args.reward_model",
     "args.rounds >= 0 or not args.reward_model", ["tests/test_bench.py"]),
    # every function of reward_model.py, lab/exact.py, lab/cli.py, lab/ddp.py and experiments/bench.py, broken once
    ("a preference with the same chosen and rejected text accepted", "reward_model.py", "        if chosen == rejected:",
     "        if False:", [RM + "a_broken_preference_file_is_one_line_that_names_the_line"]),
    ("the implicit prompt left on the responses", "reward_model.py",
     "            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]", "            pass",
     [RM + "both_layouts_read_and_score_the_same_texts"]),
    ("a file's pair too long for the context kept", "reward_model.py", "            if n > context:",
     "            if n > 2 * context:", [RM + "a_broken_preference_file_is_one_line_that_names_the_line"]),
    ("spearman without the mean rank of ties", "reward_model.py",
     "return (np.bincount(group, order) / np.bincount(group))[group]", "return order",
     [RM + "spearman_against_a_python_loop"]),
    ("the held-out pairs scored in slices of one too few", "reward_model.py", "tokens[i:i + batch] for t in pair",
     "tokens[i:i + batch - 1] for t in pair", [RM + "the_trained_model_orders_held_out_pairs_as_the_true_reward"]),
    ("the exact evaluator counts responses without the last step's end-of-text", "lab/exact.py",
     "(V - 1) ** (T - 1) * V", "(V - 1) ** T", ["tests/test_exact.py::test_exact_eval_matches_brute_force_enumeration"]),
    ("exact KL(pi || pi*) with J* subtracted", "lab/exact.py", "+ jstar / lam  ", "- jstar / lam  ",
     ["tests/test_exact.py::test_exact_eval_matches_brute_force_enumeration"]),
    ("the exact judge score from the proxy", "lab/exact.py", 'stats["gold_exact"] = (p * space["gold"]).sum(1)',
     'stats["gold_exact"] = (p * space["rewards"]).sum(1)', [JUDGE_EXACT]),
    ("the judge's loss against the frontier with its sign flipped", "lab/exact.py",
     'out["gold_lost_exact"] = out["gold_frontier_exact"] - out["gold_exact"]',
     'out["gold_lost_exact"] = out["gold_exact"] - out["gold_frontier_exact"]', [JUDGE_EXACT]),
    ("a float flag of nan or inf taken", "lab/cli.py", "if isinstance(value, float) and not math.isfinite(value):",
     "if False:", ["tests/test_cli.py", "tests/test_reliability.py::test_nonsense_is_refused_before_pre_training"]),
    ("a flag's close spelling not suggested", "lab/cli.py", "n=1)\n        raise ArgumentError", "n=0)\n        raise ArgumentError",
     ["tests/test_cli.py"]),
    ("an unexpected exception printed without its type", "lab/cli.py",
     'text = str(e) if expected else f"{type(e).__name__}: {e} (APA_DEBUG=1 shows the traceback)"',
     'text = str(e)', ["tests/test_cli.py", "tests/test_compare.py::test_apa_debug_shows_the_traceback_and_anything_unexpected_is_one_line_too"]),
    ("Ctrl-C exits with status 1", "lab/cli.py", "raise SystemExit(130) from None", "raise SystemExit(1) from None",
     ["tests/test_compare.py::test_ctrl_c_exits_130_and_says_the_same_command_continues"]),
    ("the log line without the judge's lost score", "lab/cli.py", '("gold_lost_exact", ".4f"),', "",
     ["tests/test_judge.py::test_a_run_against_a_reward_model_logs_the_judge_beside_it"]),
    ("the header without the judge", "lab/cli.py", '(f" | judge {cfg.gold_fn}" if cfg.gold_fn else "")', '""',
     ["tests/test_judge.py::test_a_run_against_a_reward_model_logs_the_judge_beside_it"]),
    ("data parallel: the global mean of the local masked sum over all entries", "lab/ddp.py",
     "sums = torch.stack([(x * mask).sum(), mask.sum()])", "sums = torch.stack([(x * mask).sum(), torch.ones_like(x).sum()])",
     ["tests/test_ddp.py::test_two_processes_compute_the_one_process_update_and_global_statistics"]),
    ("data parallel: a batch not divisible by the processes taken", "lab/ddp.py",
     "if cfg.batch_size % world or cfg.minibatch_size % world:", "if False:",
     ["tests/test_ddp.py::test_a_batch_the_processes_cannot_share_is_refused_before_joining"]),
    ("data parallel: gather_all keeps this process's list", "lab/ddp.py", "return [x for one in lists for x in one]",
     "return items", ["tests/test_ddp.py"]),
    ("bench: tokens per second of one row", "experiments/bench.py", "return args.batch_size * steps / (time.perf_counter() - t0)",
     "return steps / (time.perf_counter() - t0)", ["tests/test_bench.py"]),
    ("bench: the ratio to generate inverted", "experiments/bench.py",
     "statistics.median(a / b for a, b in zip(rates[fn], rates[theirs]))",
     "statistics.median(b / a for a, b in zip(rates[fn], rates[theirs]))", ["tests/test_bench.py"]),
    ("bench: the first untimed iteration counted", "experiments/bench.py",
     "return [statistics.median(col) for col in zip(*rows[1:])]", "return [statistics.median(col) for col in zip(*rows)]",
     ["tests/test_bench.py"]),
    ("bench: TFLOP/s of the generation time", "experiments/bench.py", "tflops = flops / upd / 1e12",
     "tflops = flops / gen / 1e12", ["tests/test_bench.py"]),
    ("bench: the matmul peak without its factor 2", "experiments/bench.py", "return 2 * n ** 3 * reps /",
     "return n ** 3 * reps /", ["tests/test_bench.py"]),
    ("bench: the reward model's ratio inverted", "experiments/bench.py",
     'ratios = [m / r for m, r in zip(times["reward model"][1:], times["rule"][1:])]',
     'ratios = [r / m for m, r in zip(times["reward model"][1:], times["rule"][1:])]', ["tests/test_bench.py"]),
    ("bench: prompts of one token too many", "experiments/bench.py",
     "lengths = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (args.batch_size,)).tolist()",
     "lengths = torch.randint(args.prompt_len // 2, args.prompt_len + 2, (args.batch_size,)).tolist()", ["tests/test_bench.py"]),
    # the functions of these five files that had no mutation yet
    ("data parallel: rank read from LOCAL_RANK, the rank within one machine", "lab/ddp.py",
     "return dist.get_rank() if dist.is_initialized() else 0",
     'return int(os.environ.get("LOCAL_RANK", 0)) if dist.is_initialized() else 0', [BARRIERS]),
    ("data parallel: world_size read from LOCAL_WORLD_SIZE, the processes of one machine", "lab/ddp.py",
     "return dist.get_world_size() if dist.is_initialized() else 1",
     'return int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if dist.is_initialized() else 1',
     ["tests/test_ddp.py::test_two_processes_compute_the_one_process_update_and_global_statistics"]),
    ("exact: all_responses puts the last step's tokens in another order", "lab/exact.py",
     "last = torch.arange(V).repeat(len(prefixes))[:, None]", "last = torch.arange(V).repeat_interleave(len(prefixes))[:, None]",
     ["tests/test_exact.py::test_exact_eval_matches_brute_force_enumeration"]),
    ("exact: the frontier's tilt measures KL(pi_init || pi)", "lab/exact.py",
     "(p * (logp - ref_logp)).sum(1).mean().item()", "(ref_logp.exp() * (ref_logp - logp)).sum(1).mean().item()",
     [FRONTIER_SPLIT]),
    ("cli: one_line keeps carriage returns, tabs and runs of spaces", "lab/cli.py", '" ".join(str(text).split())[:limit]',
     'str(text).replace("\\n", " ")[:limit]',
     ["tests/test_cli.py::test_one_line_joins_every_line_break_and_space_and_cuts_at_the_limit"]),
    ("cli: a bad flag answered by argparse's own error (usage, exit status 2)", "lab/cli.py",
     "        raise ArgumentError(message)\n", "        super().error(message)\n", ["tests/test_cli.py"]),
    ("reward model: within_prompts centres on the mean over all prompts", "reward_model.py", "    return v - means[group]",
     "    return v - v.mean()", [HELD_OUT_STATS]),
    ("reward model: save writes into out_dir in place", "reward_model.py", "    runs.replace_folder(cfg.out_dir, write)",
     "    write(cfg.out_dir)", [RM + "a_save_leaves_no_file_of_the_earlier_model"]),
    ("reward model: save leaves out the tokenizer", "reward_model.py",
     "            if isinstance(enc, HFTokenizer):\n                enc.tok.save_pretrained(tmp)\n", "",
     [RM + "init_with_its_own_tokenizer_saves_it_and_train_py_reads_the_same_scores[gpt2]"]),
    ("bench: the ids tokenizer encodes ids as strings", "experiments/bench.py", "return [int(t) for t in text.split()]",
     "return text.split()", ["tests/test_bench.py::test_the_ids_tokenizer_reads_back_what_it_writes"]),
    ("bench: the ids tokenizer decodes without spaces", "experiments/bench.py", 'return " ".join(map(str, ids))',
     'return "".join(map(str, ids))', ["tests/test_bench.py::test_the_ids_tokenizer_reads_back_what_it_writes"]),
    ("bench: the static sampler never draws end-of-text", "experiments/bench.py",
     "args.max_new_tokens, enc.eot_token, enc.n_vocab,\n", "args.max_new_tokens, enc.eot_token, enc.n_vocab - 1,\n",
     ["tests/test_bench.py::test_the_three_samplers_draw_the_same_tokens_from_the_same_prompts"]),
    ("bench: the eager loop handed the vocabulary for end-of-text", "experiments/bench.py",
     "model.generate(lm, ids, mask, args.max_new_tokens, enc.eot_token, enc.n_vocab)",
     "model.generate(lm, ids, mask, args.max_new_tokens, enc.n_vocab, enc.eot_token)",
     ["tests/test_bench.py::test_the_three_samplers_draw_the_same_tokens_from_the_same_prompts"]),
    ("bench: transformers' generate at its default top_k of 50", "experiments/bench.py",
     "temperature=1.0, top_k=0, top_p=1.0,", "temperature=1.0, top_p=1.0,",
     ["tests/test_bench.py::test_the_three_samplers_draw_the_same_tokens_from_the_same_prompts"]),
    ("bench: the RL iteration timed with the eager loop whatever the sampler", "experiments/bench.py",
     "        out = generate(*a, **k)\n", "        out = model.generate(*a, **k)\n",
     ["tests/test_bench.py::test_the_rl_iteration_samples_with_the_chosen_sampler_and_times_it_as_generation"]),
    # the functions left: bench.py's, lab/exact.py's enumeration, lab/ddp.py's barriers, compare.py's tables.
    # The first four survive, harmless: each changes only the speed that bench.py prints (its reward, the model's
    # vocabulary by one token) or, on a GPU only, a printed figure (sync, the profile's order); speed is never asserted
    ("bench: length_reward counts characters", "experiments/bench.py", "return [len(c.split()) / 32 for c in completions]",
     "return [len(c) / 32 for c in completions]", ["tests/test_bench.py"]),
    ("bench: make_model's tiny GPT one token short", "experiments/bench.py",
     "return model.tiny_gpt(train.Config(), data.task_encoding().n_vocab)",
     "return model.tiny_gpt(train.Config(), data.task_encoding().n_vocab - 1)", ["tests/test_bench.py"]),
    ("bench: sync never waits for the GPU", "experiments/bench.py", '    if device.type == "cuda":\n        torch.cuda.synchronize()',
     "    if False:\n        torch.cuda.synchronize()", ["tests/test_bench.py"]),
    ("bench: the profile sorted by host time on a GPU", "experiments/bench.py",
     'key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"', 'key = "self_cpu_time_total"',
     ["tests/test_bench.py"]),
    ("bench: main without validate", "experiments/bench.py", "        validate(args)\n", "", ["tests/test_bench.py"]),
    ("bench: the ids tokenizer's end-of-text past the vocabulary", "experiments/bench.py",
     'self.name, self.n_vocab, self.eot_token = "ids", n_vocab, n_vocab - 1',
     'self.name, self.n_vocab, self.eot_token = "ids", n_vocab, n_vocab', ["tests/test_bench.py"]),
    ("exact: prefix_levels extends the prefixes in another order", "lab/exact.py",
     "others.repeat(len(prefixes))[:, None]", "others.repeat_interleave(len(prefixes))[:, None]",
     ["tests/test_exact.py::test_exact_eval_matches_brute_force_enumeration"]),
    ("exact: response_logprobs without the placeholder", "lab/exact.py",
     "rows = [p + q + [eot] for p in prompt_tokens", "rows = [p + q for p in prompt_tokens",
     ["tests/test_exact.py::test_exact_eval_matches_brute_force_enumeration"]),
    ("data parallel: rank_zero_first lets every rank in at once", "lab/ddp.py",
     "    if dist.is_initialized() and rank() != 0:\n        dist.barrier()\n    yield",
     "    yield", [BARRIERS]),
    ("data parallel: finish ends before rank 0 has written", "lab/ddp.py",
     "        dist.barrier()\n        dist.destroy_process_group()", "        dist.destroy_process_group()", [BARRIERS]),
    ("compare.py tables: read_rows skips the first row", "experiments/compare.py",
     "for i, line in enumerate(lines, 1):\n        if not line.strip():",
     "for i, line in enumerate(lines[1:], 1):\n        if not line.strip():", [SUMMARY, TABLES]),
    ("compare.py tables: the gap key is the sampled gap", "experiments/compare.py",
     'return "gap_exact" if any("gap_exact" in r for r in rows) else "gap"',
     'return "gap_exact" if all("gap_exact" in r for r in rows) else "gap"', [SUMMARY, TABLES]),
    ("compare.py tables: moving_mean padded with zeros", "experiments/compare.py",
     'np.convolve(x, np.ones(n) / n, "valid")', 'np.convolve(x, np.ones(n) / n, "same")', [SUMMARY, TABLES]),
    ("compare.py tables: finished keeps a run still running", "experiments/compare.py",
     "        if rows and (len(rows) == iters or stopped):\n            out.append((rows, stopped))\n    return out\n\n\ndef count_note",
     "        if rows:\n            out.append((rows, stopped))\n    return out\n\n\ndef count_note", [SUMMARY, TABLES]),
    ("compare.py tables: count_note counts the stopped runs as seeds", "experiments/compare.py",
     'f" ({len(done)} of {n} seeds)" if len(done) < n', 'f" ({len(done) - stopped} of {n} seeds)" if len(done) < n',
     [SUMMARY, TABLES]),
    ("compare.py tables: the short table's KL column shows the largest KL", "experiments/compare.py",
     'cols = [("reward", ".3f"), ("kl", ".2f"), ("gap", ".3f")', 'cols = [("reward", ".3f"), ("kl_max", ".2f"), ("gap", ".3f")',
     [SUMMARY, TABLES]),
    ("compare.py tables: rm_final from the first exact evaluation", "experiments/compare.py",
     "return dict(exact[-1], distinct2=", "return dict(exact[0], distinct2=", [RM_TABLE]),
    ("compare.py tables: finished_runs keeps a run never evaluated", "experiments/compare.py",
     'and any("eval_gold" in r for r in rows):', ":", [PAPER_DONE]),
    ("compare.py tables: paper_results reads every run with the first seed", "experiments/compare.py",
     "finished_runs(\n        [paper_run_dir(cfg, algo, lr, s) for s in seeds]",
     "finished_runs(\n        [paper_run_dir(cfg, algo, lr, seeds[0]) for s in seeds]",
     [PAPER_TABLES]),
    ("compare.py tables: the paper table's diverged count of the last run", "experiments/compare.py",
     "{int(sum(x['diverged'] for x in s))} of {len(s)}", "{int(s[-1]['diverged'])} of {len(s)}", [PAPER_TABLES]),
    ("compare.py tables: the plan shortens the main runs to the map's length", "experiments/compare.py",
     "runs[key] = max(runs.get(key, 0), grid_iters)", "runs[key] = grid_iters",
     ["tests/test_compare.py::test_the_plan_runs_each_main_run_as_long_as_its_longest_table_needs"]),
    ("compare.py tables: name with the default group size", "experiments/compare.py", "return NAMES[algo].format(k=k)",
     "return NAMES[algo].format(k=4)", ["tests/test_compare.py::test_plot_labels_a_run_with_its_own_group_size"]),
    # the last of experiments/compare.py: which runs, their folders, how each is run, the plots, the rm and paper sweeps
    ("compare.py: the short setting runs only Dr. GRPO", "experiments/compare.py",
     'ONLY.get(a, ("main", "grid", "short"))', 'ONLY.get(a, ("main", "grid"))', [CMP + "each_setting_runs_its_own_algorithms"]),
    ("compare.py: the seeds of a run share its folder", "experiments/compare.py", 'f"{algo}_lr{lr:g}_seed{seed}")\n\n\ndef read_rows',
     'f"{algo}_lr{lr:g}")\n\n\ndef read_rows', [FOLDERS]),
    ("compare.py: the rm runs' lambdas to one decimal", "experiments/compare.py", 'f"{algo}_lam{lam:g}_seed{seed}"',
     'f"{algo}_lam{lam:.1f}_seed{seed}"', [FOLDERS]),
    ("compare.py: the paper runs' seeds share a folder", "experiments/compare.py",
     'return os.path.join(paper_folder(cfg), f"{algo}_lr{lr:g}_seed{seed}")', 'return os.path.join(paper_folder(cfg), f"{algo}_lr{lr:g}")',
     [FOLDERS]),
    ("compare.py: the rm setting's folder is out_dir itself", "experiments/compare.py", 'return os.path.join(cfg.out_dir, "rm")',
     "return cfg.out_dir", [FOLDERS]),
    ("compare.py: the paper setting's folder is the rm setting's", "experiments/compare.py",
     'return os.path.join(cfg.out_dir, "paper")', 'return os.path.join(cfg.out_dir, "rm")', [FOLDERS]),
    ("compare.py: rm_lams split on a comma and a space", "experiments/compare.py",
     'return [float(x) for x in cfg.rm_lams.split(",")]', 'return [float(x) for x in cfg.rm_lams.split(", ")]', [FOLDERS]),
    ("compare.py: a diverged run is not done, and runs again", "experiments/compare.py",
     ' or os.path.exists(os.path.join(path, "failed.txt"))\n\n', "\n\n",
     [CMP + "a_run_stopped_mid_write_is_not_done_and_resumes"]),
    ("compare.py: jstar_key of the fields' names alone", "experiments/compare.py",
     "return tuple((k, v) for k, v in dataclasses.asdict(cfg).items() if k not in NOT_JSTAR)",
     "return tuple(k for k, v in dataclasses.asdict(cfg).items() if k not in NOT_JSTAR)",
     ["tests/test_compare.py::test_jstar_is_estimated_once_per_pi_init_data_and_lambda"]),
    ("compare.py: the pool's workers keep Ctrl-C and the main process's run ignores it", "experiments/compare.py",
     "    if pool:                                            # Ctrl-C", "    if not pool:                                        # Ctrl-C",
     [CMP + "a_worker_of_the_pool_leaves_ctrl_c_to_the_sweep_and_runs_one_thread"]),
    ("compare.py: a run with a checkpoint starts again", "experiments/compare.py",
     'resume=os.path.exists(os.path.join(path, "ckpt.pt")))', "resume=False)", [RUN_ONE]),
    ("compare.py: a diverged run leaves no failed.txt", "experiments/compare.py",
     'with open(os.path.join(path, "failed.txt"), "w") as f:\n                f.write(str(e) + "\\n")',
     'pass', [RUN_ONE]),
    ("compare.py: pi_init pre-trained with the default config, not the jobs'", "experiments/compare.py",
     "runs.cached_pretrain(dataclasses.replace(train.Config(), **jobs[0][0]), ", "runs.cached_pretrain(train.Config(), ",
     [CMP + "run_jobs_pre_trains_the_jobs_pi_init_once_then_runs_each_job"]),
    ("compare.py: nothing to run still pre-trains and reads jobs[0]", "experiments/compare.py",
     "    if not jobs:\n        return\n    import data", "    import data",
     [CMP + "run_jobs_pre_trains_the_jobs_pi_init_once_then_runs_each_job"]),
    ("compare.py: no plot without matplotlib, silently", "experiments/compare.py",
     '        print("matplotlib is not installed: no plot (pip install matplotlib)")\n', "",
     [CMP + "plot_without_matplotlib_says_how_to_get_it"]),
    ("compare.py: a metrics file's config.json looked for in the current folder", "experiments/compare.py",
     'else os.path.dirname(path) or "."\n    rows = read_rows(path)', 'else "."\n    rows = read_rows(path)',
     [CMP + "a_run_loads_the_same_from_its_folder_and_from_its_metrics_file"]),
    ("compare.py: the curves draw each seed as a line of its own", "experiments/compare.py",
     'differ = [k for k in SETTINGS if k != "seed" and ', "differ = [k for k in SETTINGS if ", [CURVES]),
    ("compare.py: the curves' band from the first seed to the mean", "experiments/compare.py",
     "ax.fill_between(xs, curves.min(0), curves.max(0)", "ax.fill_between(xs, curves[0], curves.mean(0)", [CURVES]),
    ("compare.py: the stability map shows the first seed's gap", "experiments/compare.py",
     "mean = np.array([g.mean() for g in gaps])", "mean = np.array([g[0] for g in gaps])",
     [CMP + "the_stability_map_shows_the_mean_final_gap_over_seeds_with_min_to_max_bars"]),
    ("compare.py: the rm setting's runs iterate as the main setting's", "experiments/compare.py",
     "iters = 3 if cfg.quick else cfg.rm_iters", "iters = 3 if cfg.quick else cfg.iters", [RM_PAPER_JOBS]),
    ("compare.py: the rm runs all at the default lambda", "experiments/compare.py",
     "dict(shared, **ALGOS[algo], lam=lam, seed=seed, lr=cfg.lr)", "dict(shared, **ALGOS[algo], seed=seed, lr=cfg.lr)",
     [RM_PAPER_JOBS]),
    ("compare.py: the paper runs all at the default lr", "experiments/compare.py",
     "run_jobs(cfg, [(dict(shared, **ALGOS[algo], lr=lr, seed=seed)", "run_jobs(cfg, [(dict(shared, **ALGOS[algo], seed=seed)",
     [RM_PAPER_JOBS]),
    ("compare.py: the paper setting's budget of the main setting's iterations", "experiments/compare.py",
     "range(cfg.seeds), cfg.paper_iters, cfg.paper_eval_every,", "range(cfg.seeds), cfg.iters, cfg.paper_eval_every,",
     [RM_PAPER_JOBS]),
    ("compare.py: the rm frontier drawn in the runs' order, not the KL's", "experiments/compare.py",
     "    frontier.sort()\n", "", [RM_SWEEP]),
    ("compare.py: the rm text's accuracy against the annotator is the truth's", "experiments/compare.py",
     "accuracy {rm['accuracy']:.3f} against the annotator's", "accuracy {rm['accuracy_true']:.3f} against the annotator's",
     [RM_SWEEP]),
    ("compare.py: the paper figure against the training KL", "experiments/compare.py",
     'kl = np.mean([[r["eval_kl"] for r in rows[:n]]', 'kl = np.mean([[r["kl"] for r in rows[:n]]', [PAPER_SWEEP]),
    ("compare.py: the paper text names the evaluator as the proxy", "experiments/compare.py",
     "The proxy: {about(rms['reward_model'])}", "The proxy: {about(rms['evaluator'])}", [PAPER_SWEEP]),
    ("compare.py: the main table at the map's length", "experiments/compare.py",
     'table(cfg, "main", cfg.lr, main_iters, seeds)', 'table(cfg, "main", cfg.lr, grid_iters, seeds)', [SWEEP_LENGTHS]),
    ("compare.py: no curves for runs of exactly their length", "experiments/compare.py",
     "return [(st, rows[:iters]) for st, rows in loaded if len(rows) >= iters]",
     "return [(st, rows[:iters]) for st, rows in loaded if len(rows) > iters]", [SWEEP_LENGTHS]),
    ("compare.py: --plot of a run without the gap taken", "experiments/compare.py",
     '        lacking += [] if any(gap_key(rows) in r for r in rows) else ["gap"]\n', "",
     [CMP + "plot_of_damaged_or_foreign_metrics_is_one_line"]),
    # the theory's tests, second pass: PPO as train.py runs it, k1 in the loss, the per-state KL, GRPO's side of pi*;
    # each against the one test that pins it, a wrong formula in the code or in the test's claim
    ("the authors' APA: its fixed point claimed at lambda, not s lambda", "test_losses.py",
     "tv(logits, seq_probs(paper_form_fixed_point(init_logits, R, s * lam))) < 1e-5",
     "tv(logits, seq_probs(paper_form_fixed_point(init_logits, R, lam))) < 1e-5", [AUTHORS]),
    ("the authors' APA: its fixed point claimed pi* for s lambda", "test_losses.py",
     "tv(logits, seq_probs(paper_form_fixed_point(init_logits, R, s * lam))) < 1e-5",
     "tv(logits, token_optimum(init_logits, R, s * lam)) < 1e-5", [AUTHORS]),
    ("the authors' APA: its advantages' std claimed unweighted by the policy", "test_losses.py",
     "return masked_mean((adv - masked_mean(adv, w)) ** 2, w).add(1e-8).sqrt().item()",
     "return adv.std(unbiased=False).add(1e-8).item()", [AUTHORS]),
    ("PPO whitened: its gradient claimed grad J / T, as unwhitened", "test_losses.py",
     "torch.testing.assert_close(-T_ * std * grad_surrogate, grad_J", "torch.testing.assert_close(-T_ * grad_surrogate, grad_J",
     [PPO_WHITENED]),
    ("whitening with eps 1, not 1e-8 (steps that shrink near pi*)", "ppo.py", "def masked_whiten(x, mask, eps=1e-8,",
     "def masked_whiten(x, mask, eps=1.0,", [PPO_WHITENED]),
    ("k1 times the ratio (the reverse KL's gradient)", "grpo.py",
     "    return logprobs - ref_logprobs                               # (B, T)",
     "    return torch.exp(logprobs - old_logprobs) * (logprobs - ref_logprobs)", [K1_IN_THE_LOSS]),
    ("k1 within an update: KL(pi_theta || pi_old) for KL(pi_old || pi_theta)", "tests/test_grpo.py",
     "(log_old.exp() * (log_old - log_theta))", "(log_theta.exp() * (log_theta - log_old))", [K1_IN_THE_LOSS]),
    ("k3's gradient claimed the sequence-level forward KL (pi_init's visits)", "tests/test_grpo.py",
     "d = visits(logits.detach())", "d = visits(init_logits)", [PER_STATE_KL]),
    ("Dr. GRPO with k2 claimed at lambda, not lambda k/(k - 1) (token MDP)", "tests/test_grpo.py",
     '("dr_grpo", "k2"): exp_tilt(lam / c)', '("dr_grpo", "k2"): exp_tilt(lam)', [PLACES_TOKEN + "[dr_grpo-k2]"]),
    ("k3's ratio inverted, pi_theta / pi_init (RLOO's per-state tilt)", "grpo.py", "log_r = ref_logprobs - logprobs",
     "log_r = logprobs - ref_logprobs", [PLACES_TOKEN + "[rloo-k3]"]),
    ("RLOO's baseline includes the response itself (token MDP gradient)", "grpo.py",
     "others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)", "others = groups.mean(1, keepdim=True)",
     ["tests/test_grpo.py::test_token_mdp_gradient_with_the_kl_in_the_reward_is_grad_j_for_rloo_and_c_grad_j_for_dr_grpo"]),
    ("GRPO's std without Bessel's correction (its side of pi*)", "grpo.py", "groups.std(1, keepdim=True)",
     "groups.std(1, keepdim=True, unbiased=False)",
     ["tests/test_grpo.py::test_bandit_grpo_fixed_point_lies_past_pi_star_at_one_lambda_and_short_of_it_at_another"]),
    ("Dr. GRPO's tilt claimed without its 1 - 1/k (at lambda 0.5 and 0.05)", "tests/test_grpo.py",
     "c, p0 = (1 - 1 / k) / lam, log_init.exp()", "c, p0 = 1 / lam, log_init.exp()",
     ["tests/test_grpo.py::test_bandit_dr_grpo_fixed_point_is_a_hyperbolic_tilt_not_pi_star"]),
    # realistic bugs that once passed the whole suite (KL names, what a run is handed, threads, the critic-free value
    # head, temporary names, LoRA targets, Hugging Face loading, the held-out evaluation, lab/compare.py's summaries)
    ("grpo_loss names its KL term k3 whatever the estimator", "grpo.py",
     "dict(stats, **{kl_estimator.__name__: kl.item()})", "dict(stats, k3=kl.item())", [KL_NAME]),
    ("J* and the exact responses handed over are used though not asked for", "train.py",
     'space = known.get("space") if cfg.exact_every else None', 'space = known.get("space")', [NOT_ASKED]),
    ("--threads applied before pi_init is built", "train.py",
     "    with ddp.rank_zero_first():                                          # it builds pi_init",
     "    set_cpu_threads(cfg, device)\n    with ddp.rank_zero_first():  #", [SFT_THREADS]),
    ("GRPO's and RLOO's value head left trainable", "model.py", "    policy.v_head.requires_grad_(critic)",
     "    policy.v_head.requires_grad_(True)", [NO_VALUE_HEAD]),
    ("one temporary name for every process", "lab/runs.py", 'tmp = f"{path}.tmp{os.getpid()}"', 'tmp = f"{path}.tmp"',
     [TWO_WRITERS]),
    ("--lora_targets taken as one module name", "lab/lora.py", 'cfg.lora_targets.split(",")', "[cfg.lora_targets]",
     ["tests/test_models.py::test_lora_targets_are_module_names_separated_by_commas"]),
    ("a Hugging Face tokenizer's n_vocab without its added tokens", "lab/hf.py", "self.tok.eos_token_id, len(self.tok)",
     "self.tok.eos_token_id, self.tok.vocab_size", [ADDED_TOKENS]),
    ("a reward model's pad id from the policy's tokenizer", "lab/hf.py",
     "        model.config.pad_token_id = tokenizer.pad_token_id\n", "        model.config.pad_token_id = enc.eot_token\n",
     [REWARD_MODEL]),
    ("a hub id ships no tokenizer", "lab/hf.py", "return not os.path.isdir(path) or any(",
     "return os.path.isdir(path) and any(", [HUB_ID]),
    ("the held-out evaluation in slices of minibatch_size", "evaluation.py", "idx = rows[k:k + cfg.batch_size]",
     "idx = rows[k:k + cfg.minibatch_size]", [HELD_OUT]),
    ("--prompts without --eval_prompts evaluates the task's openings", "data.py",
     "else [] if cfg.prompts else task_eval_prompts())", "else task_eval_prompts())", [OWN_PROMPTS]),
    ("experiments/compare.py's final values from the first iterations", "experiments/compare.py", "tail, g = rows[-last:], gap_key(rows)",
     "tail, g = rows[:last], gap_key(rows)", [SUMMARY]),
    ("a Hugging Face tokenizer's end-of-text taken as GPT-2's", "lab/hf.py", "self.tok.eos_token_id, len(self.tok)",
     'self.tok.convert_tokens_to_ids("<|endoftext|>"), len(self.tok)', [ADDED_TOKENS]),
    ("a reward model's score from its first logit", "lab/hf.py", "return model(**batch).logits[:, -1].float().tolist()",
     "return model(**batch).logits[:, 0].float().tolist()", [REWARD_MODEL]),
    ("experiments/compare.py's J* key ignores sft_steps", "experiments/compare.py", '"kl", "threads"}  # J* ignores',
     '"kl", "threads", "sft_steps"}  # J* ignores', ["tests/test_compare.py::test_jstar_is_estimated_once_per_pi_init_data_and_lambda"]),
    ("compare.py's paper setting: the last gold score taken as the best", "experiments/compare.py",
     '"gold": held_out[-1]["eval_gold"]', '"gold": max(r["eval_gold"] for r in held_out)', [PAPER_TABLES]),
    ("compare.py's paper setting: the proxy's score shown as the evaluator's", "experiments/compare.py",
     '"evaluator": held_out[-1]["eval_evaluator"]', '"evaluator": held_out[-1]["eval_reward"]', [PAPER_TABLES]),
    ("compare.py's paper setting: the standard deviation shown as the standard error", "experiments/compare.py",
     "v.std(ddof=1) / math.sqrt(len(v))", "v.std(ddof=1)", [PAPER_TABLES]),
    ("compare.py's paper setting: a run whose KL ran away not counted as diverged", "experiments/compare.py",
     '"diverged": float(stopped or not kl_max <= DIVERGED_KL)', '"diverged": float(stopped)', [PAPER_TABLES]),
    ("compare.py's paper setting: the evaluator's order compared with the proxy's", "experiments/compare.py",
     'agree = "yes" if order["evaluator"] == order["gold"]', 'agree = "yes" if order["evaluator"] == order["reward"]',
     [PAPER_TABLES]),
    ("compare.py's paper setting: the evaluator fitted with the proxy's seed", "experiments/compare.py",
     'QUICK_EVALUATOR = ["--seed=1"', 'QUICK_EVALUATOR = ["--seed=0"', [PAPER_RUN]),
    ("compare.py's paper setting: the runs handed no evaluator", "experiments/compare.py",
     "    return dict(model, **folders, gold_fn=", "    return dict(model, reward_model=folders[\"reward_model\"], gold_fn=",
     [PAPER_RUN]),
    ("experiments/compare.py's samples to a quarter of the gap: the curve's index", "experiments/compare.py",
     "samples[reached[0]] if len(reached)", "reached[0] if len(reached)", [SUMMARY]),
    # the fixes of what misbehaved: each undone
    ("any thread count taken", "lab/checks.py", "0 <= cfg.threads <= most_threads", "cfg.threads >= 0", [NONSENSE]),
    ("a field an older checkpoint lacks is not compared", "lab/runs.py",
     "for k, v in fields.items() if k not in RESUME_MAY_CHANGE and then[k] != v]",
     "for k, v in fields.items() if k in saved and k not in RESUME_MAY_CHANGE and then[k] != v]", [PREDATES]),
    ("two sweeps at once in one out_dir", "experiments/compare.py",
     "with runs.exclusive(cfg.out_dir) if cfg.run else contextlib.nullcontext():", "with contextlib.nullcontext():",
     [SECOND_SWEEP]),
    ("--settings=kl --short_iters=0 taken", "experiments/compare.py", "if short and not cfg.short_iters and not cfg.plot:",
     "if False:", ["tests/test_compare.py::test_a_bad_setting_is_one_line"]),
    ("--sample prints at most the 40 task prompts", "lab/runs.py",
     "[task[i % len(task)] for i in range(cfg.num_samples)]", "task[:cfg.num_samples]", [SAMPLE_N]),
    ("a named pipe for --prompts said not to exist", "lab/checks.py",
     "        if not path or os.path.isfile(path):\n            continue\n        if not os.path.exists(path) or",
     "        if not path or os.path.isfile(path):\n            continue\n        if True or", [PIPE]),
    ("a reward of shape 2 x B/2 flattened", "data.py", "scores = torch.as_tensor(scores, dtype=torch.float32).cpu()",
     "scores = torch.as_tensor(scores, dtype=torch.float32).flatten().cpu()", [REWARD_FAILURES]),
    ("a reward of 10**400 not named", "data.py", "    except OverflowError as e:", "    except RecursionError as e:",
     [REWARD_FAILURES]),
    # beyond the list: the new code, and the code around these bugs, broken one line at a time
    ("a reward of shape B x 2 read as its first column", "data.py", "if scores.shape == (n, 1):",
     "if scores.dim() == 2:", [SCORE_SHAPES]),
    ("--threads refused at 4 a core", "lab/checks.py", "0 <= cfg.threads <= most_threads", "0 <= cfg.threads < most_threads",
     ["tests/test_reliability.py::test_threads_up_to_four_a_core"]),
    ("a field an older checkpoint lacks compared with its unresolved default", "train.py",
     "runs.checkpoint_to_resume(cfg, resolve)", "runs.checkpoint_to_resume(cfg, lambda cfg: cfg)",
     ["tests/test_reliability.py::test_a_checkpoint_that_predates_a_field_with_a_derived_default_resumes"]),
    ("the sweep's lock on sft_dir", "experiments/compare.py", "with runs.exclusive(cfg.out_dir) if cfg.run",
     "with runs.exclusive(cfg.sft_dir) if cfg.run", [SECOND_SWEEP]),
    ("a pipe for --prompts taken under torchrun", "lab/checks.py", 'int(os.environ.get("WORLD_SIZE", "1")) > 1',
     'int(os.environ.get("WORLD_SIZE", "1")) > 2', [PIPE]),
    ("any file that is not a folder taken as prompts", "lab/checks.py",
     "if not stat.S_ISFIFO(os.stat(path).st_mode):", "if False:", [NONSENSE]),
    ("a temporary name per parent process", "lab/runs.py", 'tmp = f"{path}.tmp{os.getpid()}"',
     'tmp = f"{path}.tmp{os.getppid()}"', [TWO_WRITERS]),
    ("only GRPO's value head frozen", "lab/lora.py", "critic=cfg.algo not in CRITIC_FREE)",
     'critic=cfg.algo != "grpo")', [NO_VALUE_HEAD]),
    ("J* handed over used though --jstar_samples=0", "train.py",
     'jstar = known.get("jstar") if cfg.jstar_samples else None', 'jstar = known.get("jstar")', [NOT_ASKED]),
    ("a reward model without a tokenizer keeps the first tokens", "lab/hf.py",
     "enc.encode_ordinary(t)[-model.config.max_position_embeddings:]", "enc.encode_ordinary(t)[:model.config.max_position_embeddings]",
     [REWARD_MODEL_NO_TOKENIZER]),
    ("a reward model without a tokenizer pads on the left", "model.py", "ids = [t + [pad_id] * (width - len(t)) for t in",
     "ids = [[pad_id] * (width - len(t)) + t for t in", [REWARD_MODEL_NO_TOKENIZER]),
    ("--init without a tokenizer read with the task's", "lab/hf.py", 'cfg.init if ships_tokenizer(cfg.init) else "gpt2")',
     'cfg.init if ships_tokenizer(cfg.init) else "task")',
     ["tests/test_models.py::test_init_without_a_tokenizer_is_read_with_gpt2s_bpe"]),
    ("the held-out evaluation steps by minibatch_size", "evaluation.py", "for k in range(0, len(rows), cfg.batch_size):",
     "for k in range(0, len(rows), cfg.minibatch_size):", [HELD_OUT]),
    ("experiments/compare.py's largest KL: the last 10-iteration mean", "experiments/compare.py",
     'out["kl_max"] = float(moving_mean([r["kl"] for r in rows]).max())',
     'out["kl_max"] = float(moving_mean([r["kl"] for r in rows])[-1])', [SUMMARY]),
    ("experiments/compare.py's exact gap smoothed", "experiments/compare.py", '    if key == "gap_exact":\n        return x, y\n', "",
     [SUMMARY]),
    ("experiments/compare.py's spread over seeds without Bessel's correction", "experiments/compare.py", "np.nanstd(v, ddof=1)",
     "np.nanstd(v)", [SUMMARY]),
    ("experiments/compare.py's stability map: the first seed's largest KL", "experiments/compare.py",
     "max(x['kl_max'] for x in s)", "s[0]['kl_max']", [SUMMARY]),
    ("a reward model's config pad id kept over the one its tokenizer pads with", "lab/hf.py",
     "        model.config.pad_token_id = tokenizer.pad_token_id\n",
     "        if model.config.pad_token_id is None:\n            model.config.pad_token_id = tokenizer.pad_token_id\n",
     [REWARD_MODEL]),
    ("a reward model's tokenizer must have an end-of-text", "lab/hf.py",
     "tokenizer = auto_tokenizer(path) if ships_tokenizer(path) else None",
     "tokenizer = HFTokenizer(path).tok if ships_tokenizer(path) else None", [ENCODER_REWARD_MODEL]),
    ("a reward model's tokenizer pads with end-of-text instead of its pad token", "lab/hf.py",
     "tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token", "tokenizer.pad_token = tokenizer.eos_token",
     [ENCODER_REWARD_MODEL]),
    ("a model's list of end-of-text ids read as one id", "lab/checks.py", "(eos if isinstance(eos, list) else [eos])", "[eos]",
     [ADDED_TOKENS]),
    ("a checkpoint's config with a field this version lacks refused", "lab/runs.py",
     "type(cfg)(**{k: v for k, v in saved.items() if k in fields})", "type(cfg)(**saved)", [PREDATES]),
    ("experiments/compare.py's kl table: the largest KL for the final one", "experiments/compare.py",
     'for c, f in (("gap", ".3f"), ("kl", ".2f"))]', 'for c, f in (("gap", ".3f"), ("kl_max", ".2f"))]', [TABLES]),
    ("experiments/compare.py's kl table: GRPO's own place read as every algorithm's", "experiments/compare.py",
     '("short", base) if kl == KL_DEFAULT[base] else', '("short", base) if kl == "k3" else', [TABLES]),
    ("experiments/compare.py's fixed-point table from the main runs", "experiments/compare.py",
     'finished(cfg, "short", algo, lr, seeds, iters)]\n        lines.append(f"| {name(algo)} | {FIXED_POINT[algo]}',
     'finished(cfg, "main", algo, lr, seeds, iters)]\n        lines.append(f"| {name(algo)} | {FIXED_POINT[algo]}',
     [TABLES]),
    ("data parallel: the samples of one process", "train.py", "samples=(it + 1) * cfg.batch_size,",
     "samples=(it + 1) * cfg.batch_size // world_size(),", [TORCHRUN]),
    ("data parallel: the logged kl of one process", "train.py", '"kl": global_mean(seq_kl).item()', '"kl": seq_kl.mean().item()',
     ["tests/test_ddp.py::test_two_processes_compute_the_one_process_update_and_global_statistics"]),
    # minimal.py, the one-file edition: a copy that drifts from its original, and the loop's wiring against train.py's
    ("minimal.py: its copy of GAE without gae_lambda", "minimal.py",
     "        running = deltas[:, t] + gamma * gae_lambda * running", "        running = deltas[:, t] + gamma * running",
     [MINIMAL_COPIES]),
    ("minimal.py: its copy of APA's loss with lambda squared", "minimal.py",
     "    step = advantages / lam if not clip else", "    step = advantages / lam ** 2 if not clip else", [MINIMAL_COPIES]),
    ("minimal.py: PPO's advantages not whitened", "minimal.py", '    if cfg.algo == "ppo":\n        advantages = masked_whiten(',
     '    if cfg.algo == "PPO":\n        advantages = masked_whiten(', [MINIMAL_SAME + "[ppo]"]),
    ("minimal.py: the value loss left out of the update", "minimal.py", "loss = pg_loss + cfg.vf_coef * vf_loss",
     "loss = pg_loss + 0 * vf_loss", [MINIMAL_SAME + "[apa]"]),
    ("minimal.py: gradients not clipped", "minimal.py", "            nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)\n",
     "", [MINIMAL_SAME + "[apa]"]),
    ("minimal.py: the KL penalty at twice lambda", "minimal.py",
     "rewards = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, cfg.lam)",
     "rewards = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, 2 * cfg.lam)", [MINIMAL_SAME + "[apa]"]),
    ("minimal.py: the KL guard ignored", "minimal.py", "stop = cfg.target_kl and pg_stats[\"approx_kl\"] > cfg.target_kl",
     "stop = cfg.target_kl and pg_stats[\"approx_kl\"] > 1e9 * cfg.target_kl",
     ["tests/test_minimal.py::test_minimal_stops_an_update_where_train_py_s_kl_guard_does"]),
    ("minimal.py: its copy of the KL-penalised reward puts the score on the first token", "minimal.py",
     "rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))",
     "rewards.scatter_add(1, 0 * last[:, None], scores[:, None].to(rewards.dtype))", [MINIMAL_COPIES]),
    ("minimal.py: its copy of whitening divides by the variance", "minimal.py",
     "    var = mean_fn((x - mean) ** 2, mask)                         # ()  population variance",
     "    var = mean_fn((x - mean) ** 2, mask) ** 2                    # ()  population variance", [MINIMAL_COPIES]),
    ("minimal.py: its copy of PPO's loss takes the min", "minimal.py",
     "    pg_loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)   # ()",
     "    pg_loss = masked_mean(torch.min(pg_loss1, pg_loss2), mask)   # ()", [MINIMAL_COPIES]),
    ("minimal.py: its copy of the value loss takes the min", "minimal.py",
     "    vf_loss = 0.5 * masked_mean(torch.max(vf_loss1, vf_loss2), mask)  # ()",
     "    vf_loss = 0.5 * masked_mean(torch.min(vf_loss1, vf_loss2), mask)  # ()", [MINIMAL_COPIES]),
    ("minimal.py: the logits one position late", "minimal.py",
     "    return out.logits[:, P - 1:-1], out.hidden_states[-1][:, P - 1:-1]",
     "    return out.logits[:, P:], out.hidden_states[-1][:, P:]", [MINIMAL_SAME + "[apa]"]),
    ("minimal.py: J* from the mean of the log instead of the log of the mean", "minimal.py",
     "    return (cfg.lam * w.mean(1).log()).mean().item()", "    return (cfg.lam * w.log().mean(1)).mean().item()",
     [MINIMAL_SAME + "[apa]"]),
    ("minimal.py: the value head not started at 0", "minimal.py",
     "        nn.init.zeros_(self.v_head.weight)                               # V = 0 at the start\n", "",
     [MINIMAL_SAME + "[apa]"]),
    ("minimal.py: the run seeded with the seed of pi_init", "minimal.py", "    torch.manual_seed(cfg.seed)\n",
     "    torch.manual_seed(1234)\n", [MINIMAL_SAME + "[apa]"]),
    ("minimal.py: pi_init cached under another name than train.py's", "minimal.py", "_L{N_LAYER}_H{N_HEAD}_",
     "_L{N_HEAD}_H{N_LAYER}_", [MINIMAL_PRETRAIN]),
    ("lab/smollm2.py: the folder written without its tokenizer", "lab/smollm2.py",
     "        tokenizer.save_pretrained(tmp)                                   # `out` appears complete or not at all\n",
     "", ["tests/test_smollm2.py::test_init_reads_the_folder_with_its_own_end_of_text_and_left_padding_changes_no_logprob"]),
    ("minimal.py: pi_init pre-trained without its fixed seed", "minimal.py",
     "    torch.manual_seed(1234)                                              # the same pi_init for every run seed\n",
     "", [MINIMAL_PRETRAIN]),
    # a real model (lab/smollm2.py), its reward (lab/sentiment.py), and a run that cannot learn (lab/checks.py)
    ("equal rewards warned about at every batch", "lab/checks.py", "self.judged = len(scores) > 1",
     "self.judged = False", SAME_REWARDS),
    ("equal rewards judged in every batch, the late ones too", "lab/checks.py", "        if self.judged:\n            return\n",
     "", SAME_REWARDS),
    ("equal rewards judged by a batch of one response", "lab/checks.py", "self.judged = len(scores) > 1",
     "self.judged = len(scores) > 0", SAME_REWARDS),
    ("the GGUF model rebuilt without its weights", "lab/smollm2.py",
     "        lm.load_state_dict(gguf_lm.state_dict())", "", [SMOLLM2_WEIGHTS]),
    ("VADER's positive share as the reward", "lab/sentiment.py", '["compound"]', '["pos"]', [VADER]),
    ("--init with a GGUF file handed on to transformers", "lab/checks.py", 'if cfg.init.endswith(".gguf"):', "if False:",
     ["tests/test_train.py::test_init_with_a_gguf_file_says_how_to_convert_it"]),
]


def check(mutations):
    """Every original snippet occurs exactly once in its file, and every test a mutation names exists (pytest would
    answer a missing one with exit status 4, which would read as caught); otherwise stop, loudly."""
    bad = []
    for name, path, old, _, *tests in mutations:
        with open(os.path.join(ROOT, path)) as f:
            n = f.read().count(old)
        if n != 1:
            bad.append(f"  {name!r}: {path} holds the snippet {n} times (must be exactly once): {old!r}")
        for test in (tests[0] if tests else []):
            file, _, function = test.partition("::")
            with open(os.path.join(ROOT, file)) as f:
                if function and not re.search(rf"^def {re.escape(function.split('[')[0])}\(", f.read(), re.M):
                    bad.append(f"  {name!r}: no test {test}")
    if bad:
        sys.exit("mutation snippets out of date:\n" + "\n".join(bad))


def copy_repo(dst):
    ignore = shutil.ignore_patterns(".git", ".venv", "out", "__pycache__", ".pytest_cache", "*.pyc")
    shutil.copytree(ROOT, dst, ignore=ignore)


def run_one(mutation, env, tests, only=""):
    name, path, old, new, *own_tests = mutation
    tests = own_tests[0] if own_tests else tests
    with tempfile.TemporaryDirectory(prefix="mutant_") as tmp:
        repo = os.path.join(tmp, "repo")
        copy_repo(repo)
        file = os.path.join(repo, path)
        with open(file) as f:
            text = f.read()
        with open(file, "w") as f:
            f.write(text.replace(old, new, 1))
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
                              + (["-k", only] if only else []),
                              cwd=repo, env=env, capture_output=True, text=True)
        failed = re.findall(r"^FAILED (\S+)", proc.stdout, re.M)
        errored = re.findall(r"^ERROR (\S+)", proc.stdout, re.M)
        caught_by = (failed or errored or [f"exit status {proc.returncode}"])[0] if proc.returncode else ""
        return name, path, caught_by, time.time() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="", help="only the mutations whose name contains this (or one of these, comma-separated)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at the same time")
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    parser.add_argument("--tests", default="", help="run only the tests matching this pytest -k expression")
    args = parser.parse_args()
    check(MUTATIONS)
    chosen = [m for m in MUTATIONS if any(k.strip() in m[0].lower() for k in args.k.lower().split(","))]
    if args.list:
        for name, path, old, new, *_ in chosen:
            print(f"{name}  ({path}): {old!r} -> {new!r}")
        return
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.setdefault("OMP_NUM_THREADS", "1")     # one thread per mutant, as the jobs share the cores (with torch's
                                               # default of one per core, measured 5 to 10 times slower)
    shared = env.setdefault("APA_TEST_SFT_DIR", os.path.join(tempfile.gettempdir(), "apa_mutate_sft"))
    print(f"{len(chosen)} mutations, {args.jobs} at a time; tests: {' '.join(TESTS)}; pi_init cached in {shared}")
    t0, survived = time.time(), []
    warm = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "tests/test_exact.py",
                           "-k", "rollout_against_slow_versions and ppo"], cwd=ROOT, env=env)  # pi_init, once
    if warm.returncode:
        sys.exit("the unmutated code fails the tests: fix that first")
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for name, path, caught_by, seconds in pool.map(lambda m: run_one(m, env, TESTS, args.tests), chosen):
            print(f"{'caught  ' if caught_by else 'SURVIVED'} {name} ({path}, {seconds:.0f}s)"
                  + (f": {caught_by}" if caught_by else ""), flush=True)
            if not caught_by:
                survived.append(name)
    print(f"{len(chosen) - len(survived)}/{len(chosen)} caught in {time.time() - t0:.0f}s"
          + (f"; survived: {', '.join(survived)}" if survived else ""))
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()

"""The built-in `llama2 train` / `llama2 eval` commands: group -> name -> (module, config class,
runner, help). Plain data, read by `llama2.cli`, which imports a command's module only when its group
is on the command line (so `llama2 generate` never imports the trainers)."""

from __future__ import annotations

BUILTIN_COMMANDS: dict[str, dict[str, tuple[str, str, str, str]]] = {
    "train": {
        "tokenizer": (
            "llama2.train.tokenizer",
            "TokenizerTrainConfig",
            "train_tokenizer",
            "train a SentencePiece BPE tokenizer with Llama 2's settings",
        ),
        "pretrain": (
            "llama2.train.pretrain",
            "PretrainConfig",
            "run_pretrain",
            "pretrain a Llama 2-architecture model on text (the paper's recipe as defaults)",
        ),
        "code": (
            "llama2.train.code",
            "CodePretrainConfig",
            "run_code_pretrain",
            "pretrain a code model with Code Llama's fill-in-the-middle objective",
        ),
        "sft": (
            "llama2.train.sft",
            "SFTConfig",
            "run_sft",
            "supervised fine-tuning on chat dialogs (full or LoRA), loss on assistant tokens only",
        ),
        "preferences": (
            "llama2.train.preference_build",
            "PreferenceBuildConfig",
            "run_preference_build",
            "sample the chat model and label preference pairs (helpfulness and safety) by the checkers",
        ),
        "reward": (
            "llama2.train.reward",
            "RewardConfig",
            "run_reward",
            "train a reward model (helpfulness or safety) with the margin ranking loss",
        ),
        "rejection": (
            "llama2.train.rejection",
            "RejectionConfig",
            "run_rejection",
            "rejection sampling: best of K samples by reward, fine-tuned with SFT, pooled over iterations",
        ),
        "ppo": (
            "llama2.train.ppo",
            "PPOConfig",
            "run_ppo",
            "PPO against the helpfulness and safety reward models with a KL penalty to the start model",
        ),
        "gatt": (
            "llama2.train.gatt",
            "GattConfig",
            "run_gatt",
            "Ghost Attention: multi-turn dialogs that keep a first-turn instruction, loss on the last turn",
        ),
        "dpo": (
            "llama2.train.dpo",
            "DPOConfig",
            "run_dpo",
            "direct preference optimisation on the preference pairs (an alternative to RM + PPO)",
        ),
    },
    "eval": {
        "perplexity": (
            "llama2.eval.perplexity",
            "PerplexityConfig",
            "run_perplexity",
            "mean NLL per token and perplexity of a model on a text or token file",
        ),
        "exact-match": (
            "llama2.eval.exact_match",
            "ExactMatchConfig",
            "run_exact_match",
            "greedy chat answers scored by the instruction suite's checkers",
        ),
        "infill": (
            "llama2.eval.infill_eval",
            "InfillEvalConfig",
            "run_infill_eval",
            "held-out fill-in-the-middle accuracy of a code model",
        ),
        "reward": (
            "llama2.eval.reward_eval",
            "RewardEvalConfig",
            "run_reward_eval",
            "reward-model accuracy per rating bucket and safety recall/precision on held-out pairs",
        ),
        "rejection-curve": (
            "llama2.eval.rejection_curve",
            "RejectionCurveConfig",
            "run_rejection_curve",
            "max and median reward of the best of N samples against N and temperature",
        ),
        "gatt": (
            "llama2.eval.gatt_eval",
            "GattEvalConfig",
            "run_gatt_eval",
            "adherence to a first-turn instruction at every later turn of a dialog",
        ),
        "recipe": (
            "llama2.eval.recipe",
            "RecipeEvalConfig",
            "run_recipe_eval",
            "the stage table: exact match, rewards, safety and GAtt adherence of each stage's model",
        ),
    },
}

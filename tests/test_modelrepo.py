"""A model repository per run, one branch per step as in EleutherAI's Pythia repositories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hubserver import HubServer

from exporter.cli.hub import push
from exporter.errors import PublishError
from exporter.hub.modelrepo import push_model_repo
from exporter.hub.publish import RetryPolicy
from exporter.pipeline.export import ExportOptions
from exporter.pipeline.run import BuildOptions, build
from exporter.samples import TINY, tiny_run_config, write_run
from exporter.sources import LocalSource

STEPS = (0, 2, 8)
NO_WAIT = RetryPolicy(attempts=4, base_delay=0)
MODEL = "neox/tiny-model"
TOKENIZER = {"tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}',
             "special_tokens_map.json": '{"eos_token": "<|endoftext|>"}'}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    write_run(run, TINY, steps=STEPS, dp=2, config=tiny_run_config(STEPS[-1]))
    out = tmp_path_factory.mktemp("built") / "archive"
    build(LocalSource(run), out, BuildOptions(quiet=True, export=ExportOptions(include=("model",))))
    return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    for name, text in TOKENIZER.items():
        (folder / name).write_text(text)
    return folder


def logits(model_dir_or_repo: str | Path, revision: str | None = None) -> torch.Tensor:
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(model_dir_or_repo, revision=revision,
                                               torch_dtype=torch.float32)
    tokens = torch.arange(12).reshape(2, 6) % TINY.vocab_size
    with torch.no_grad():
        return model(tokens).logits


def test_every_step_loads_from_its_branch_with_the_logits_of_the_step_folder(
    hub_server: HubServer, archive: Path, tokenizer: Path
) -> None:
    result = push_model_repo(archive, MODEL, tokenizer=str(tokenizer), dataset_repo="neox/tiny",
                             retry=NO_WAIT)

    branches = hub_server.branches(MODEL)
    assert sorted(branches) == sorted(["main", *(f"step{s}" for s in STEPS)])
    assert sorted(result.branches) == sorted(branches) and len(result.commits) == len(branches)
    for step in STEPS:
        files = hub_server.list_files(MODEL, revision=f"step{step}")
        assert set(files) == {".gitattributes", "config.json", "model.safetensors",
                              "generation_config.json", *TOKENIZER}
        assert torch.equal(logits(MODEL, f"step{step}"), logits(archive / "steps" / f"step{step}"))
    assert not torch.equal(logits(MODEL, "step0"), logits(MODEL, "step8"))
    assert torch.equal(logits(MODEL), logits(archive / "steps" / "step8"))
    card = hub_server.read_file(MODEL, "README.md").decode()
    assert 'revision="step0"' in card and "datasets/neox/tiny" in card
    generation = json.loads(hub_server.read_file(MODEL, "generation_config.json",
                                                 revision="step2"))
    config = json.loads((archive / "steps/step2/config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"]
    assert hub_server.internal_errors == []


def test_pushing_again_commits_nothing_and_an_interrupted_push_resumes(
    hub_server: HubServer, archive: Path
) -> None:
    lost = hub_server.inject_lost_response(r"^/api/models/.+/commit/step2")
    hub_server.inject(method="POST", path_regex=r"^/api/models/.+/commit/step8", status=503)

    first = push_model_repo(archive, MODEL, retry=NO_WAIT)
    again = push_model_repo(archive, MODEL, retry=NO_WAIT)

    assert lost.fired == 1
    assert all(first.branches[f"step{s}"] for s in STEPS) and again.commits == []
    assert hub_server.commit_count(MODEL, branch="step2") == 2  # the initial commit and one
    with pytest.raises(PublishError, match="no tokenizer.json or vocab.json"):
        push_model_repo(archive, MODEL, tokenizer=str(archive), retry=NO_WAIT)


def test_push_command_publishes_the_model_repo_and_links_it_from_the_dataset_card(
    hub_server: HubServer, archive: Path, tmp_path: Path
) -> None:
    import shutil

    copy = Path(shutil.copytree(archive, tmp_path / "archive"))

    outcome = CliRunner().invoke(push, [str(copy), "neox/tiny", "--model-repo", MODEL])

    assert outcome.exit_code == 0, outcome.output
    assert "model repo" in outcome.output
    assert sorted(hub_server.branches(MODEL)) == sorted(["main", *(f"step{s}" for s in STEPS)])
    card = hub_server.read_file("neox/tiny", "README.md", repo_type="dataset").decode()
    assert f"from_pretrained(\"{MODEL}\", revision=\"step8\")" in card


def test_build_push_model_to_publishes_every_built_step(
    hub_server: HubServer, tmp_path: Path, tokenizer: Path
) -> None:
    from exporter.cli import cli

    write_run(tmp_path / "run", TINY, steps=(0, 1), dp=2, config=tiny_run_config(1))
    args = ["-q", "build", str(tmp_path / "run"), "--out", str(tmp_path / "a"),
            "--include", "model", "--push-to", "neox/pushed", "--push-model-to", MODEL,
            "--tokenizer", str(tokenizer)]

    outcome = CliRunner().invoke(cli, args)

    assert outcome.exit_code == 0, outcome.output
    assert sorted(hub_server.branches(MODEL)) == ["main", "step0", "step1"]
    assert "tokenizer.json" in hub_server.list_files(MODEL, revision="step1")
    assert torch.equal(logits(MODEL, "step1"), logits(tmp_path / "a" / "steps" / "step1"))
    card = hub_server.read_file("neox/pushed", "README.md", repo_type="dataset").decode()
    assert MODEL in card
    refused = CliRunner().invoke(cli, [*args[:-2], "--delete-after-push"])
    assert refused.exit_code == 2 and "weights kept" in refused.output


def test_tokenizer_files_come_from_a_hub_model_repository(
    hub_server: HubServer, archive: Path
) -> None:
    hub_server.seed_repo("EleutherAI/pythia-tok", {name: text.encode()
                                                   for name, text in TOKENIZER.items()})

    push_model_repo(archive, MODEL, steps=[2], tokenizer="hf://EleutherAI/pythia-tok",
                    retry=NO_WAIT)

    for name, text in TOKENIZER.items():
        assert hub_server.read_file(MODEL, name, revision="step2").decode() == text
    assert sorted(hub_server.branches(MODEL)) == ["main", "step2"]
    with pytest.raises(PublishError, match="nothing-here: no such model repository"):
        push_model_repo(archive, MODEL, tokenizer="hf://EleutherAI/nothing-here", retry=NO_WAIT)

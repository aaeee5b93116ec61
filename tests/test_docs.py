"""The docs ship with the project, say what the commands say, and link only to what exists."""

import re
import subprocess
from pathlib import Path

from dowser_tool.cli.docs import _main as sync_option_tables

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_option_tables_are_generated_from_the_commands():
    assert sync_option_tables(["--check"]) == 0  # run `python -m dowser_tool.cli.docs` to refresh them


def test_links_point_inside_the_project_and_exist():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


OUTSIDE, OUTSIDE_DOCS = "../" + "shared", "shared/" + "docs"  # split so this file does not match itself


def test_no_file_refers_outside_the_project():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for name in tracked:
        path = ROOT / name
        if path.suffix in (".safetensors", ".png", ".json") or not path.is_file():
            continue
        text = path.read_text(errors="ignore")
        assert OUTSIDE not in text and OUTSIDE_DOCS not in text, name


def test_readme_is_short_and_its_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 150
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = next(line for line in ci.splitlines() if "pytest" in line and "pip install" in line)
    assert test_command.strip() in readme


def test_docs_cite_only_tests_that_exist():
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("*.py"))
    defined = set(re.findall(r"def (test_\w+)", tests))
    files = {p.name for p in (ROOT / "tests").glob("*.py")}
    for page in PAGES:
        for quoted in re.findall(r"`([^`]*test_\w+[^`]*)`", page.read_text()):
            for name in re.findall(r"(test_\w+(?:\.py)?)", quoted):
                assert (name in files) if name.endswith(".py") else (name in defined), f"{page.name} cites {name}"


README_NAMES = {  # family (tests/families.py) -> how the README's "Model families" names it
    "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3", "phi3": "Phi-3", "gpt2": "GPT-2", "qwen3_moe": "Qwen3-MoE", "mixtral": "Mixtral",
    "lfm2": "LFM2", "jamba": "Jamba", "qwen3_next": "Qwen3-Next", "granitemoehybrid": "GraniteMoeHybrid",
    "gpt_oss": "GPT-OSS", "llama4_text": "Llama 4", "gemma3n_text": "Gemma 3n", "qwen2_reward": "Qwen2 reward model",
    "florence2": "Florence-2", "llava": "LLaVA", "llava_next": "LLaVA-Next", "llava_onevision": "LLaVA-OneVision",
    "qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL", "idefics3": "Idefics3",
    "smolvlm": "SmolVLM", "paligemma": "PaliGemma", "gemma3": "Gemma 3 (multimodal)", "internvl": "InternVL",
    "mllama": "Mllama", "mistral3": "Mistral 3", "nvila_folder": "NVILA", "nvila_hf": "NVILA", "ovis2": "Ovis2"}


def test_readme_lists_the_family_matrix():
    from .families import FAMILIES

    section = (ROOT / "README.md").read_text().split("## Model families", 1)[1].split("\n## ", 1)[0]
    section = " ".join(section.split())
    assert set(README_NAMES) == set(FAMILIES)
    assert [n for n, shown in README_NAMES.items() if shown not in section] == []

"""What leaves the machine: git and `gcloud ... --source=.` never take an env file; docs/deploy.md
keeps secrets in Secret Manager and says which Stripe signing secret `stripe listen` needs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV_FILES = [".env", ".env.prod.yaml", ".env.local", ".env.production", "prod.env.yaml", "staging.env.yaml",
             "functions/.env", "deploy/.env.prod.yaml", "config/prod.env.yaml"]
SHIPPED = ["main.py", "requirements.txt", "functions/main.py", "upshift_platform/app.py",
           "upshift_platform/console/index.html"]
SECRET_SETTINGS = ["DATABASE_URL", "SUPABASE_JWT_SECRET", "UPSHIFT_AUDIT_SIGNING_KEY", "STRIPE_SECRET_KEY",
                   "STRIPE_WEBHOOK_SECRET"]


def _ignored(repo: Path, paths: list[str]) -> set[str]:
    """Which of ``paths`` git ignores in ``repo`` (``git check-ignore``, no index: tracked or not)."""
    done = subprocess.run(["git", "-C", str(repo), "check-ignore", "--no-index", "--stdin"],
                          input="\n".join(paths) + "\n", capture_output=True, text=True, check=False)
    assert done.returncode in (0, 1), done.stderr
    return set(done.stdout.split())


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_ignores_env_files_and_nothing_it_needs():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    assert _ignored(ROOT, ENV_FILES) == set(ENV_FILES)
    assert _ignored(ROOT, SHIPPED) == set()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_gcloudignore_leaves_env_files_out_of_the_upload(tmp_path):
    """.gcloudignore has .gitignore's syntax: read it with git in a scratch repository."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    shutil.copy(ROOT / ".gcloudignore", tmp_path / ".gitignore")
    assert _ignored(tmp_path, ENV_FILES) == set(ENV_FILES)
    assert _ignored(tmp_path, SHIPPED) == set()  # what the functions run is uploaded
    patterns = [line.strip() for line in (ROOT / ".gcloudignore").read_text().splitlines()]
    assert ".env*" in patterns and "*.env.yaml" in patterns
    assert not any(line.startswith("#!include") for line in patterns)  # self-contained: no include to go stale


def _deploy_commands(text: str) -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    return [b.replace("\\\n", " ") for b in blocks if "gcloud functions deploy" in b]


def test_deploy_guide_keeps_secrets_in_secret_manager():
    text = (ROOT / "docs" / "deploy.md").read_text()
    assert "--env-vars-file" not in text and ".env.prod.yaml" not in text
    (deploy,) = _deploy_commands(text)
    assert "--set-secrets=$SECRETS" in deploy
    secrets = re.search(r'SECRETS="([^"]+)"', deploy)
    settings = re.search(r'SETTINGS="([^"]+)"', deploy)
    assert secrets and settings
    mapped = dict(item.split("=", 1) for item in secrets.group(1).replace(" ", "").split(","))
    assert sorted(mapped) == sorted(SECRET_SETTINGS)
    assert all(re.fullmatch(r"upshift-[a-z-]+:(latest|\d+)", ref) for ref in mapped.values())
    plain = settings.group(1).replace(" ", "")
    assert not any(f"{name}=" in plain for name in SECRET_SETTINGS)  # no secret as a plain env var
    assert "roles/secretmanager.secretAccessor" in text
    for ref in mapped.values():  # every secret it references is created in the guide
        assert f"gcloud secrets create {ref.split(':')[0]} " in text


def test_deploy_guide_says_which_secret_stripe_listen_needs():
    text = (ROOT / "docs" / "deploy.md").read_text()
    assert "stripe listen --print-secret" in text
    assert "stripe listen --forward-to" in text
    assert re.search(r"signs them with its own secret", text)
    assert "STRIPE_WEBHOOK_SECRET" in text and "invalid_signature" in text


def test_deploy_guide_says_the_admin_must_exist_or_be_created():
    text = (ROOT / "docs" / "deploy.md").read_text()
    assert "signed in once" in text and "--create-user" in text
    assert "audit purge --yes" in text

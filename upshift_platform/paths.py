"""Where the project's files live (migrations, compat SQL, demo data)."""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """The checkout holding ``supabase/migrations`` (``UPSHIFT_PROJECT_DIR`` overrides)."""
    env = os.environ.get("UPSHIFT_PROJECT_DIR")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve().parent.parent
    if (here / "supabase" / "migrations").is_dir():
        return here
    cwd = Path.cwd().resolve()
    for candidate in [cwd, *cwd.parents]:
        if (candidate / "supabase" / "migrations").is_dir():
            return candidate
    return here


def migrations_dir() -> Path:
    return project_root() / "supabase" / "migrations"


def compat_sql() -> Path:
    return project_root() / "sql" / "supabase_compat.sql"

"""Users, groups, environment and PATH lookup as Garden resolves them.

Pure functions over file contents, so they run unchanged inside a container's
mount namespace (where ``/etc/passwd`` is the container's) and in unit tests.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
USER_PATH = "/usr/local/bin:/usr/bin:/bin"


class UserNotFound(LookupError):
    def __init__(self, user: str) -> None:
        super().__init__(f"unable to find user {user}: no matching entries in passwd file")


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str
    groups: tuple[int, ...]


def _read(path: str) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n").split(":") for line in f if line.strip() and not line.startswith("#")]
    except FileNotFoundError:
        return []


def _supplementary(name: str, gid: int, group_rows: list[list[str]]) -> tuple[int, ...]:
    groups = [gid]
    for row in group_rows:
        if len(row) >= 4 and name in row[3].split(",") and row[2].isdigit():
            groups.append(int(row[2]))
    return tuple(dict.fromkeys(groups))


def resolve_user(spec: str, etc: str = "/etc") -> User:
    """Resolve ``name``, ``uid``, ``uid:gid``, ``name:group`` against etc/passwd and etc/group.

    Empty means root. Raises UserNotFound for names with no passwd entry.
    """
    passwd = _read(os.path.join(etc, "passwd"))
    group_rows = _read(os.path.join(etc, "group"))
    user_part, _, group_part = (spec or "root").partition(":")
    entry = next(
        (r for r in passwd if len(r) >= 6 and (r[0] == user_part or (user_part.isdigit() and r[2] == user_part))),
        None,
    )
    if entry is None:
        if not user_part.isdigit():
            if user_part == "root":
                entry = ["root", "x", "0", "0", "", "/root"]
            else:
                raise UserNotFound(spec)
        else:
            uid = int(user_part)
            gid = _group_id(group_part, group_rows, spec) if group_part else uid
            # runc sets no supplementary groups for a user without a passwd entry (GATS checks `id`).
            return User(name=user_part, uid=uid, gid=gid, home="/", groups=())
    name, uid, gid, home = entry[0], int(entry[2]), int(entry[3]), entry[5] or "/"
    if group_part:
        gid = _group_id(group_part, group_rows, spec)
    return User(name=name, uid=uid, gid=gid, home=home, groups=_supplementary(name, gid, group_rows))


def _group_id(group: str, group_rows: list[list[str]], spec: str) -> int:
    if group.isdigit():
        return int(group)
    for row in group_rows:
        if len(row) >= 3 and row[0] == group and row[2].isdigit():
            return int(row[2])
    raise UserNotFound(spec)


def merge_env(*layers: list[str]) -> list[str]:
    """Later layers win for a key; a key keeps the position of its first appearance."""
    merged: dict[str, str] = {}
    for layer in layers:
        for item in layer:
            key, sep, value = item.partition("=")
            if sep:
                merged[key] = value
    return [f"{k}={v}" for k, v in merged.items()]


def process_env(image_env: list[str], container_env: list[str], process_env: list[str], user: User, user_spec: str) -> list[str]:
    """Garden's order (image < container < process), then PATH, USER and HOME defaults."""
    env = dict(item.partition("=")[::2] for item in merge_env(image_env, container_env, process_env))
    env.setdefault("PATH", ROOT_PATH if user.uid == 0 else USER_PATH)
    env.setdefault("USER", user_spec or "root")
    env.setdefault("HOME", user.home)
    return [f"{k}={v}" for k, v in env.items()]


def find_executable(path: str, env_path: str) -> str | None:
    """The file ``path`` names, looked up on ``env_path`` if it has no slash."""
    if "/" in path:
        return path if os.path.exists(path) else None
    for directory in env_path.split(":"):
        candidate = os.path.join(directory or ".", path)
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            return candidate
    return None

"""favordynmods for real: after ``favor_dynmods`` some cgroup mount shows it."""

from gactor.kernel import cgroups


def _cgroup_mounts_with_favordynmods() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        lines = [line.split() for line in f]
    return [fields[4] for fields in lines if "-" in fields
            and fields[fields.index("-") + 1] in ("cgroup", "cgroup2")
            and "favordynmods" in fields[fields.index("-") + 3].split(",")]


def test_favor_dynmods_leaves_a_cgroup_mount_showing_it() -> None:
    # On 6.18 the mode cannot be turned off again, so the first run on a host turns it on
    # and later runs find it on: either way a mount must show it afterwards, and a second
    # call must find nothing to do.
    cgroups.favor_dynmods()
    assert _cgroup_mounts_with_favordynmods()
    assert cgroups.favor_dynmods() is None

"""Pure logic of issue 18: the keyring, credential splitting, keyed fingerprints, the destination
policy, log escaping and clone error sentences."""
from __future__ import annotations

import ipaddress
import logging

import pytest

from exploop.config import ConfigError
from exploop.core.keyring import InvalidToken, Keyring, generate_key, keyed_hash, load_keyring
from exploop.core.vault import join_credentials, split_credentials
from exploop.destinations import DestinationPolicy, DestinationRefused, repo_host
from exploop.logs import TextFormatter
from workers.workspace import clone_error


def test_keyring_seals_and_any_listed_key_opens():
    old, new = generate_key(), generate_key()
    sealed_old = Keyring([old]).encrypt("oauth2:glpat-123")
    assert "glpat" not in sealed_old
    ring = Keyring([new, old])
    assert ring.decrypt(sealed_old) == "oauth2:glpat-123"
    assert not ring.is_current(sealed_old)
    rotated = ring.rotate(sealed_old)
    assert ring.is_current(rotated) and Keyring([new]).decrypt(rotated) == "oauth2:glpat-123"
    with pytest.raises(InvalidToken):
        Keyring([generate_key()]).decrypt(sealed_old)


def test_load_keyring_from_environment_or_file(tmp_path):
    one, two = generate_key(), generate_key()
    assert load_keyring({}) is None
    assert load_keyring({"SECRET_KEY": f"{one}, {two}"}).size == 2
    path = tmp_path / "secret.key"
    path.write_text(f"{one}\n{two}\n")
    ring = load_keyring({"SECRET_KEY_FILE": str(path)})
    assert ring.size == 2 and Keyring([one]).decrypt(ring.encrypt("x")) == "x"


@pytest.mark.parametrize("config, message", [
    ({"SECRET_KEY": "not-a-key-but-secret-looking"}, "EXPLOOP_SECRET_KEY: key 1 is not a Fernet key"),
    ({"SECRET_KEY_FILE": "/nonexistent/secret.key"}, "EXPLOOP_SECRET_KEY_FILE: cannot read /nonexistent"),
    ({"SECRET_KEY": "a", "SECRET_KEY_FILE": "b"}, "are both set"),
])
def test_bad_key_settings_name_the_setting_never_the_value(config, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_keyring(config)
    assert "secret-looking" not in str(caught.value)


def test_keyed_hash_differs_per_tenant_and_is_stable():
    a, b = "tenant-a-key", "tenant-b-key"
    assert keyed_hash(a, "hunter2") == keyed_hash(a, "hunter2")
    assert keyed_hash(a, "hunter2") != keyed_hash(b, "hunter2")


@pytest.mark.parametrize("url, shown, userinfo", [
    ("https://oauth2:tok@git.example.com/a.git", "https://***@git.example.com/a.git", "oauth2:tok"),
    ("https://u:p@ss@host:8443/a", "https://***@host:8443/a", "u:p@ss"),  # the last @ ends them
    ("https://tok@host/a", "https://***@host/a", "tok"),
    ("https://host/a@b", "https://host/a@b", None),  # an @ in the path is not userinfo
    ("git@github.com:org/r.git", "git@github.com:org/r.git", None),
    ("https://@host/a", "https://host/a", None),
])
def test_split_credentials(url, shown, userinfo):
    assert split_credentials(url) == (shown, userinfo)
    if userinfo:
        assert join_credentials(shown, userinfo) == url


def _resolver(table):
    return lambda host, port: [ipaddress.ip_address(a) for a in table.get(host, [])]


RESOLVE = _resolver({
    "public.example": ["93.184.216.34"], "loop.example": ["127.0.0.1"], "ten.example": ["10.1.2.3"],
    "mixed.example": ["93.184.216.34", "192.168.1.5"], "meta.example": ["169.254.169.254"],
    "cgnat.example": ["100.100.100.200"], "mcast.example": ["224.0.0.251"], "v6local.example": ["::1"],
    "mapped.example": ["::ffff:10.0.0.1"], "ula.example": ["fd00:ec2::254"], "git.corp": ["10.9.9.9"],
})


@pytest.mark.parametrize("host", ["loop.example", "ten.example", "mixed.example", "meta.example", "cgnat.example",
                                  "mcast.example", "v6local.example", "mapped.example", "ula.example",
                                  "127.0.0.1", "169.254.169.254", "0.0.0.0", "nowhere.example"])
def test_default_policy_refuses_non_public_destinations_with_one_message(host):
    with pytest.raises(DestinationRefused) as caught:
        DestinationPolicy().check(host, 443, resolve=RESOLVE)
    assert str(caught.value) == (f"repository host {host!r} is refused by the destination policy: repositories"
                                 " must be on public addresses, or on hosts the operator allows")


def test_default_policy_allows_public_hosts_and_submit_lets_unresolved_hosts_through():
    assert DestinationPolicy().check("public.example", 443, resolve=RESOLVE) == [
        ipaddress.ip_address("93.184.216.34")]
    assert DestinationPolicy().check("nowhere.example", 443, unresolved_ok=True, resolve=RESOLVE) == []


def test_allow_list_and_deny_list():
    policy = DestinationPolicy.parse("127.0.0.0/8, *.corp", "93.184.216.0/24, blocked.example")
    assert policy.check("loop.example", 443, resolve=RESOLVE)
    assert policy.check("git.corp", 443, resolve=RESOLVE)  # by name, whatever it resolves to
    for host in ("public.example", "blocked.example", "ten.example"):
        with pytest.raises(DestinationRefused):
            policy.check(host, 443, resolve=RESOLVE)
    assert DestinationPolicy.from_dict(policy.to_dict()) == policy
    with pytest.raises(ConfigError, match="EXPLOOP_REPO_DESTINATIONS_DENY: 'host!' is neither"):
        DestinationPolicy.parse("", "bad host!")


@pytest.mark.parametrize("url, target", [
    ("https://u:p@Git.Example.com/a.git", ("git.example.com", 443)),
    ("ssh://git@[::1]:2222/x", ("::1", 2222)),
    ("git@github.com:org/r.git", ("github.com", 22)),
    ("file:///tmp/repo", None),
])
def test_repo_host(url, target):
    assert repo_host(url) == target


def test_text_logs_escape_control_characters():
    record = logging.LogRecord("exploop", logging.INFO, __file__, 1, "job accepted repo=%s",
                               ("https://h/x\n2026-11-30 INFO [exploop] forged\x1b[2J",), None)
    line = TextFormatter("%(levelname)s %(message)s").format(record)
    assert line == "INFO job accepted repo=https://h/x\\n2026-11-30 INFO [exploop] forged\\x1b[2J"


@pytest.mark.parametrize("output, sentence, retry", [
    ("fatal: Authentication failed for 'https://h/x/'", "repository S needs credentials, or the ones given"
                                                         " were refused", False),
    ("remote: Repository not found.\nfatal: repository 'https://h/x/' not found",
     "repository S was not found (or the credentials given cannot see it)", False),
    ("fatal: unable to access 'https://h/x/': Failed to connect to h port 443: Connection refused",
     "the repository host of S could not be reached or failed while sending it; the job will be retried", True),
    ("fatal: unable to access 'https://h/x/': The requested URL returned error: 503",
     "the repository host of S could not be reached or failed while sending it; the job will be retried", True),
    ("fatal: unable to access 'https://h/': SSL certificate problem: self-signed certificate",
     "the identity of the repository host of S could not be verified (TLS certificate or SSH host key)", False),
    ("fatal: couldn't find remote ref nope", "ref 'nope' not found in S", False),
    ("fatal: protocol error: bad pack header", "repository S could not be cloned; git said: protocol error:"
                                               " bad pack header", False),
])
def test_clone_errors_are_one_clear_sentence(output, sentence, retry):
    error = clone_error(output, "S", "nope")
    assert (str(error), error.retry) == (sentence, retry)


@pytest.mark.parametrize("url, shown", [
    ("https://u:p@ss@host/a@b", "https://***@host/a@b"),
    ("https://host/a@b", "https://host/a@b"),
    ("https://tok@host/x", "https://***@host/x"),
])
def test_redaction_hides_credentials_up_to_the_last_at_of_the_authority(url, shown):
    from exploop.redaction import redact_url
    from exploop.redaction import redact_url as agent_redact
    assert redact_url(url) == agent_redact(url) == shown


def test_submit_lookups_are_cached_briefly_and_agent_lookups_never(monkeypatch):
    from exploop import destinations
    calls = []
    monkeypatch.setattr(destinations, "_resolve", lambda host, port: calls.append(host) or [])
    monkeypatch.setattr(destinations, "_submit_cache", {})
    for _ in range(3):
        assert destinations.resolve_for_submit("burst.example", 443) == []
    assert calls == ["burst.example"]
    monkeypatch.setattr(destinations, "SUBMIT_CACHE_SECONDS", 0.0)
    destinations.resolve_for_submit("fresh.example", 443)
    destinations.resolve_for_submit("fresh.example", 443)
    assert calls == ["burst.example", "fresh.example", "fresh.example"]

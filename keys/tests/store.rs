//! The key store through its public API, on real files.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use boringtun::x25519;
use meshward_keys::{KeyError, KeyStore, NodeKey, PublicKey};

// RFC 7748 section 6.1, in `wg` base64: Alice's private key a, X25519(a, 9),
// Bob's public key, and the shared secret.
const RFC_ALICE_SECRET: &str = "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=";
const RFC_ALICE_PUBLIC: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
const RFC_BOB_PUBLIC: &str = "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08=";
const RFC_SHARED: &str = "Sl2dW6TOLeFyjjv0gDUPJeB+IclH0Z4zdvCbPB4WF0I=";
const RFC_ALICE_SECRET_HEX: &str =
    "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a";

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    store: KeyStore,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("var/lib/meshward");
    let store = KeyStore::new(&dir);
    Fixture {
        _tmp: tmp,
        dir,
        store,
    }
}

/// Puts `content` at `path` with `mode`, as an operator or another tool would.
fn put(path: &Path, content: &[u8], mode: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().mode() & 0o7777
}

fn hex32(s: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    out
}

#[test]
fn rfc7748_vector_through_the_key_file() {
    let f = fixture();
    put(
        &f.store.key_path(),
        format!("{RFC_ALICE_SECRET}\n").as_bytes(),
        0o600,
    );
    let key = f.store.load().unwrap();
    assert_eq!(key.public().to_string(), RFC_ALICE_PUBLIC);
    // The same key built from raw bytes: the file encoding is the wg one.
    let from_bytes = NodeKey::from_secret(x25519::StaticSecret::from(hex32(RFC_ALICE_SECRET_HEX)));
    assert_eq!(*from_bytes.to_wg_base64_secret(), RFC_ALICE_SECRET);
    assert_eq!(from_bytes.public(), key.public());
    // secret() is boringtun's StaticSecret: it does the DH the RFC lists.
    let bob: x25519::PublicKey = RFC_BOB_PUBLIC.parse::<PublicKey>().unwrap().into();
    let shared = key.secret().diffie_hellman(&bob);
    let expected: PublicKey = RFC_SHARED.parse().unwrap();
    assert_eq!(shared.as_bytes(), expected.as_bytes());
}

#[test]
fn load_or_generate_creates_dir_and_file_then_reloads_the_same_key() {
    let f = fixture();
    assert!(matches!(f.store.load(), Err(KeyError::NotFound { .. })));
    let key = f.store.load_or_generate().unwrap();
    assert_eq!(mode_of(&f.dir), 0o700);
    let path = f.store.key_path();
    assert_eq!(path, f.dir.join("key"));
    assert_eq!(mode_of(&path), 0o600);
    // One line, exactly like `wg genkey`.
    let content = fs::read_to_string(&path).unwrap();
    assert_eq!(content, format!("{}\n", *key.to_wg_base64_secret()));
    assert_eq!(content.len(), 45);

    assert_eq!(f.store.load_or_generate().unwrap().public(), key.public());
    assert_eq!(f.store.load().unwrap().public(), key.public());
    assert_eq!(fs::read_to_string(&path).unwrap(), content);
    // Only the key and the lock file: no temp files left behind.
    let mut names: Vec<_> = fs::read_dir(&f.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["key", "key.lock"]);
}

#[test]
fn existing_dir_mode_is_left_alone() {
    let f = fixture();
    fs::create_dir_all(&f.dir).unwrap();
    fs::set_permissions(&f.dir, fs::Permissions::from_mode(0o755)).unwrap();
    f.store.load_or_generate().unwrap();
    assert_eq!(mode_of(&f.dir), 0o755);
}

#[test]
fn loose_permissions_are_rejected_and_the_file_kept() {
    for mode in [0o644, 0o640, 0o604, 0o660, 0o606, 0o610, 0o601] {
        let f = fixture();
        let key = NodeKey::generate();
        let content = format!("{}\n", *key.to_wg_base64_secret());
        put(&f.store.key_path(), content.as_bytes(), mode);
        let err = f.store.load().unwrap_err();
        match &err {
            KeyError::Permissions { path, mode: found } => {
                assert_eq!(path, &f.store.key_path());
                assert_eq!(*found, mode);
            }
            other => panic!("mode {mode:o}: {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
        assert!(
            msg.contains(&format!("chmod 600 {}", f.store.key_path().display())),
            "{msg}"
        );
        assert!(matches!(
            f.store.load_or_generate(),
            Err(KeyError::Permissions { .. })
        ));
        assert!(matches!(
            f.store.rotate(),
            Err(KeyError::Permissions { .. })
        ));
        assert_eq!(fs::read_to_string(f.store.key_path()).unwrap(), content);
        assert_eq!(mode_of(&f.store.key_path()), mode);
    }
    // Owner-only modes are fine, read-only included.
    for mode in [0o600, 0o400, 0o700] {
        let f = fixture();
        let key = NodeKey::generate();
        put(
            &f.store.key_path(),
            key.to_wg_base64_secret().as_bytes(),
            mode,
        );
        assert_eq!(f.store.load().unwrap().public(), key.public());
    }
}

#[test]
fn foreign_owner_is_rejected() {
    let f = fixture();
    let key = NodeKey::generate();
    put(
        &f.store.key_path(),
        key.to_wg_base64_secret().as_bytes(),
        0o600,
    );
    let other = 65534; // nobody
    if let Err(e) = std::os::unix::fs::chown(f.store.key_path(), Some(other), None) {
        eprintln!("NOTE: skipping foreign-owner test, cannot chown (need root): {e}");
        return;
    }
    match f.store.load().unwrap_err() {
        KeyError::Owner { path, owner, .. } => {
            assert_eq!(path, f.store.key_path());
            assert_eq!(owner, other);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        f.store.load_or_generate(),
        Err(KeyError::Owner { .. })
    ));
    assert_eq!(
        fs::read_to_string(f.store.key_path()).unwrap(),
        *key.to_wg_base64_secret()
    );
}

#[test]
fn corrupt_files_are_errors_and_never_replaced() {
    let key = NodeKey::generate();
    let b64 = key.to_wg_base64_secret();
    let mut stray_bits = b64.to_string();
    // The last data character carries 2 unused bits; set one.
    let last = stray_bits.as_bytes()[42];
    let bumped = if last == b'/' { b'+' } else { last + 1 };
    stray_bits.replace_range(42..43, std::str::from_utf8(&[bumped]).unwrap());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("just a newline", b"\n".to_vec()),
        ("truncated", format!("{}\n", &b64[..30]).into_bytes()),
        ("too long", format!("{}AAAA\n", &b64[..43]).into_bytes()),
        (
            "bad alphabet",
            format!("{}*{}\n", &b64[..10], &b64[11..]).into_bytes(),
        ),
        (
            "urlsafe alphabet",
            format!("{}_{}\n", &b64[..10], &b64[11..]).into_bytes(),
        ),
        ("no padding", format!("{}A\n", &b64[..43]).into_bytes()),
        ("stray bits", format!("{stray_bits}\n").into_bytes()),
        ("two lines", format!("{}\n{}\n", *b64, *b64).into_bytes()),
        ("blank line after", format!("{}\n\n", *b64).into_bytes()),
        ("crlf", format!("{}\r\n", *b64).into_bytes()),
        ("leading space", format!(" {}\n", *b64).into_bytes()),
        ("binary", vec![0xff, 0x00, 0x13, 0x37, 0xfe]),
        ("hex key", format!("{RFC_ALICE_SECRET_HEX}\n").into_bytes()),
        ("huge", vec![b'A'; 1 << 20]),
    ];
    for (what, content) in cases {
        let f = fixture();
        put(&f.store.key_path(), &content, 0o600);
        for (op, result) in [
            ("load", f.store.load()),
            ("load_or_generate", f.store.load_or_generate()),
            ("rotate", f.store.rotate().map(|r| r.current)),
        ] {
            let err = result.expect_err(what);
            let KeyError::Corrupt { path, .. } = &err else {
                panic!("{what}/{op}: {err:?}");
            };
            assert_eq!(path, &f.store.key_path(), "{what}");
            let msg = format!("{err} {err:?}");
            assert!(
                msg.contains("corrupt") && msg.contains("left untouched"),
                "{msg}"
            );
            // The message describes the damage without quoting the key.
            assert!(
                !msg.contains(&b64[..12]),
                "{what}/{op} leaks key material: {msg}"
            );
            assert_eq!(
                fs::read(f.store.key_path()).unwrap(),
                content,
                "{what}/{op}"
            );
        }
        assert!(!f.dir.join("key.previous").exists(), "{what}");
    }
}

#[test]
fn corrupt_errors_say_what_is_wrong() {
    let f = fixture();
    put(&f.store.key_path(), b"c2hvcnQ=\n", 0o600);
    let msg = f.store.load().unwrap_err().to_string();
    assert!(
        msg.contains("expected 44 base64 characters") && msg.contains("found 8"),
        "{msg}"
    );
    assert!(
        msg.contains(&f.store.key_path().display().to_string()),
        "{msg}"
    );

    put(
        &f.store.key_path(),
        format!("{}-{}\n", &RFC_ALICE_SECRET[..5], &RFC_ALICE_SECRET[6..]).as_bytes(),
        0o600,
    );
    let msg = f.store.load().unwrap_err().to_string();
    assert!(msg.contains("invalid character '-' at position 5"), "{msg}");
}

#[test]
fn symlinks_are_rejected_not_followed() {
    let f = fixture();
    let key = NodeKey::generate();
    let target = f._tmp.path().join("elsewhere");
    put(&target, key.to_wg_base64_secret().as_bytes(), 0o600);
    fs::create_dir_all(&f.dir).unwrap();
    std::os::unix::fs::symlink(&target, f.store.key_path()).unwrap();
    for result in [f.store.load(), f.store.load_or_generate()] {
        match result.unwrap_err() {
            KeyError::Symlink { path } => assert_eq!(path, f.store.key_path()),
            other => panic!("{other:?}"),
        }
    }
    assert!(fs::symlink_metadata(f.store.key_path())
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        fs::read_to_string(&target).unwrap(),
        *key.to_wg_base64_secret()
    );

    // A dangling link is refused too, not treated as "no key yet".
    fs::remove_file(f.store.key_path()).unwrap();
    std::os::unix::fs::symlink(f._tmp.path().join("nothing"), f.store.key_path()).unwrap();
    assert!(matches!(
        f.store.load_or_generate(),
        Err(KeyError::Symlink { .. })
    ));
    assert!(!f._tmp.path().join("nothing").exists());

    // Same for the previous key.
    let f = fixture();
    f.store.load_or_generate().unwrap();
    std::os::unix::fs::symlink(&target, f.dir.join("key.previous")).unwrap();
    match f.store.previous().unwrap_err() {
        KeyError::Symlink { path } => assert_eq!(path, f.dir.join("key.previous")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn non_regular_files_are_rejected() {
    let f = fixture();
    fs::create_dir_all(f.store.key_path()).unwrap();
    assert!(matches!(
        f.store.load_or_generate(),
        Err(KeyError::NotRegularFile { .. })
    ));

    // A FIFO must not hang the agent.
    let f = fixture();
    fs::create_dir_all(&f.dir).unwrap();
    nix::unistd::mkfifo(
        &f.store.key_path(),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    assert!(matches!(
        f.store.load(),
        Err(KeyError::NotRegularFile { .. })
    ));
}

#[test]
fn rotate_keeps_the_previous_key_until_forgotten() {
    let f = fixture();
    assert!(matches!(f.store.rotate(), Err(KeyError::NotFound { .. })));
    assert!(matches!(f.store.previous(), Err(KeyError::NotFound { .. })));
    f.store.forget_previous().unwrap();

    let k1 = f.store.load_or_generate().unwrap();
    assert!(f.store.previous().unwrap().is_none());

    let r = f.store.rotate().unwrap();
    assert_eq!(r.previous.public(), k1.public());
    assert_ne!(r.current.public(), k1.public());
    assert_eq!(f.store.load().unwrap().public(), r.current.public());
    assert_eq!(
        f.store.load_or_generate().unwrap().public(),
        r.current.public()
    );
    assert_eq!(f.store.previous().unwrap().unwrap().public(), k1.public());
    let prev_path = f.dir.join("key.previous");
    assert_eq!(mode_of(&prev_path), 0o600);
    assert_eq!(mode_of(&f.store.key_path()), 0o600);
    assert_eq!(
        fs::read_to_string(&prev_path).unwrap(),
        format!("{}\n", *k1.to_wg_base64_secret())
    );

    // A second rotation supersedes the first: K1 is no longer kept.
    let r2 = f.store.rotate().unwrap();
    assert_eq!(r2.previous.public(), r.current.public());
    assert_eq!(
        f.store.previous().unwrap().unwrap().public(),
        r.current.public()
    );

    f.store.forget_previous().unwrap();
    assert!(!prev_path.exists());
    assert!(f.store.previous().unwrap().is_none());
    f.store.forget_previous().unwrap();
    assert_eq!(f.store.load().unwrap().public(), r2.current.public());
}

/// The state a rotation leaves if it dies between its two renames (see
/// `KeyStore::rotate`), built by hand: it must read as "not rotated".
#[test]
fn interrupted_rotation_state_reads_as_not_rotated() {
    let f = fixture();
    let k1 = f.store.load_or_generate().unwrap();
    fs::copy(f.store.key_path(), f.dir.join("key.previous")).unwrap();
    put(&f.dir.join(".key.tmp"), b"half a ke", 0o600);
    assert_eq!(f.store.load().unwrap().public(), k1.public());
    assert!(f.store.previous().unwrap().is_none());
    let r = f.store.rotate().unwrap();
    assert_eq!(r.previous.public(), k1.public());
    assert!(!f.dir.join(".key.tmp").exists());
}

#[test]
fn previous_is_validated_like_the_key() {
    let f = fixture();
    f.store.load_or_generate().unwrap();
    let prev = f.dir.join("key.previous");
    put(
        &prev,
        NodeKey::generate().to_wg_base64_secret().as_bytes(),
        0o644,
    );
    match f.store.previous().unwrap_err() {
        KeyError::Permissions { path, mode } => {
            assert_eq!(path, prev);
            assert_eq!(mode, 0o644);
        }
        other => panic!("{other:?}"),
    }
    put(&prev, b"garbage\n", 0o600);
    assert!(matches!(
        f.store.previous(),
        Err(KeyError::Corrupt { path, .. }) if path == prev
    ));
}

#[test]
fn debug_output_never_contains_the_secret() {
    let f = fixture();
    f.store.load_or_generate().unwrap();
    let r = f.store.rotate().unwrap();
    for key in [&r.current, &r.previous, &f.store.load().unwrap()] {
        let secret = key.to_wg_base64_secret();
        for text in [
            format!("{key:?}"),
            format!("{key:#?}"),
            format!("{r:?}"),
            format!("{:?}", f.store),
        ] {
            assert!(!text.contains(secret.as_str()), "{text}");
            assert!(!text.contains(&secret[..16]), "{text}");
        }
        assert!(format!("{key:?}").contains(&key.public().to_string()));
    }
}

fn wg_available() -> bool {
    match Command::new("wg").arg("--version").output() {
        Ok(o) if o.status.success() => true,
        _ => {
            // CI installs wireguard-tools: there a missing `wg` is a failure.
            assert!(
                std::env::var_os("CI").is_none(),
                "`wg` (wireguard-tools) is missing in CI; scripts/install-deps must install it"
            );
            eprintln!(
                "NOTE: `wg` (wireguard-tools) not found; skipping the wg compatibility test. \
                 Install it with `apt-get install -y wireguard-tools`."
            );
            false
        }
    }
}

fn wg(args: &[&str], stdin: &[u8]) -> String {
    let mut child = Command::new("wg")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "wg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Our key file is a `wg` private key file, both ways round.
#[test]
fn wg_tools_agree() {
    if !wg_available() {
        return;
    }
    // Our file -> `wg pubkey`.
    let f = fixture();
    let key = f.store.load_or_generate().unwrap();
    let file = fs::read(f.store.key_path()).unwrap();
    assert_eq!(wg(&["pubkey"], &file), format!("{}\n", key.public()));
    let r = f.store.rotate().unwrap();
    let file = fs::read(f.store.key_path()).unwrap();
    assert_eq!(wg(&["pubkey"], &file), format!("{}\n", r.current.public()));
    let file = fs::read(f.dir.join("key.previous")).unwrap();
    assert_eq!(wg(&["pubkey"], &file), format!("{}\n", key.public()));

    // `wg genkey` output -> our store.
    let f = fixture();
    let genkey = wg(&["genkey"], b"");
    put(&f.store.key_path(), genkey.as_bytes(), 0o600);
    let loaded = f.store.load().unwrap();
    assert_eq!(
        format!("{}\n", loaded.public()),
        wg(&["pubkey"], genkey.as_bytes())
    );
    assert_eq!(format!("{}\n", *loaded.to_wg_base64_secret()), genkey);

    // And the RFC vector, for good measure.
    assert_eq!(
        wg(&["pubkey"], RFC_ALICE_SECRET.as_bytes()),
        format!("{RFC_ALICE_PUBLIC}\n")
    );
}

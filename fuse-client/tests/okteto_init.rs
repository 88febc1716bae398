//! Golden files for `devmount init --from-okteto`. Each case converts a fixture okteto manifest
//! (`fixtures/okteto/`) into exactly `fixtures/okteto/expected/CASE.yml`, with exactly the
//! notes of `expected/CASE.notes` (one a line), and the devmount.yml made loads with the
//! manifest's own parser. The command itself runs in a temporary directory.
//!
//! After a deliberate change to the conversion, regenerate the expected files with
//! `DEVMOUNT_BLESS=1 cargo test -p devmount --test okteto_init` and review their diff.

mod cli;

use std::path::{Path, PathBuf};
use std::time::Duration;

use cli::{devmount, failure, Golden};
use devmount::manifest::okteto::{self, Conversion};
use devmount::manifest::{Manifest, ManifestTarget, PortForward, Workload, FILE_NAME};

struct Case {
    name: &'static str,
    okteto: &'static str,
    dev: Option<&'static str>,
}

const CASES: &[Case] = &[
    // The current form, two dev containers: the first with every field that maps (the
    // environment as a list, forwards of each form) and many that do not.
    Case { name: "current-api", okteto: "current", dev: Some("api") },
    // The second: a selector, the environment as a mapping, a shell for a command, sync's folder
    // as the workdir, the volume off.
    Case { name: "current-worker", okteto: "current", dev: Some("worker") },
    // The older single-dev form.
    Case { name: "legacy", okteto: "legacy", dev: None },
    // One dev container and a forward: okteto's root user is the only note.
    Case { name: "minimal", okteto: "minimal", dev: None },
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/okteto")
}

fn okteto_path(case: &Case) -> PathBuf {
    fixtures().join(format!("{}.yml", case.okteto))
}

fn expected(case: &Case, ext: &str) -> PathBuf {
    fixtures().join(format!("expected/{}.{ext}", case.name))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The case converted, its messages naming the file as `devmount init` in its directory would.
fn converted(case: &Case) -> Conversion {
    okteto::convert(&read(&okteto_path(case)), Path::new(okteto::DEFAULT_FILE), case.dev)
        .unwrap_or_else(|e| panic!("{}: {e}", case.name))
}

fn notes_text(conversion: &Conversion) -> String {
    conversion.notes.iter().map(|n| format!("{n}\n")).collect()
}

fn load(case: &Case) -> Manifest {
    let path = expected(case, "yml");
    Manifest::parse(&read(&path), &path, Path::new("/")).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn golden_files() {
    let mut golden = Golden::new();
    for case in CASES {
        let conversion = converted(case);
        golden.check(&expected(case, "yml"), &conversion.manifest);
        golden.check(&expected(case, "notes"), &notes_text(&conversion));
    }
    golden.finish("the conversion");
}

#[test]
fn golden_files_load_as_devmount_manifests() {
    for case in CASES {
        let manifest = load(case);
        assert!(matches!(manifest.target, ManifestTarget::Kubernetes(_)), "{}", case.name);
        assert_eq!(manifest.name, converted(case).dev, "the session is named after the dev container");
        assert!(manifest.environment.is_empty(), "okteto's environment is the container's, not exec's");
    }

    let api = load(&CASES[0]);
    let ManifestTarget::Kubernetes(k) = &api.target else { unreachable!() };
    assert_eq!(k.namespace.as_deref(), Some("shop"));
    assert_eq!(k.context.as_deref(), Some("kind-dev"));
    assert_eq!(k.workload, Workload::Deployment("api".into()));
    assert_eq!(k.timeout, Duration::from_secs(300));
    assert_eq!(k.dev.command.as_deref(), Some("yarn start"));
    assert_eq!(k.dev.workdir.as_deref(), Some("/usr/src/app"));
    assert_eq!(k.dev.image, None, "a variable okteto fills in is left out");
    let env: Vec<(&str, &str)> = k.dev.environment.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(env, [("NODE_ENV", "development"), ("PORT", "8080"), ("VERSION", "1.10")]);
    assert_eq!(
        k.dev.resources.limits,
        [("memory".into(), "2Gi".into()), ("nvidia.com/gpu".into(), "1".into())]
    );
    assert_eq!(k.dev.security_context.run_as_user, Some(1000));
    assert_eq!(k.dev.security_context.fs_group, Some(2000));
    assert_eq!(k.dev.security_context.allow_privilege_escalation, Some(false));
    assert_eq!(k.dev.security_context.capabilities_drop, Some(vec!["NET_RAW".into()]));
    assert_eq!(k.dev.persistent_volume.size, "10Gi");
    assert_eq!(k.dev.persistent_volume.storage_class.as_deref(), Some("fast"));
    assert_eq!(k.dev.volumes, ["/root/.npm", "/usr/src/app/node_modules"]);
    let forwards = |f: &[PortForward]| f.iter().map(|f| (f.local, f.remote)).collect::<Vec<_>>();
    assert_eq!(forwards(&api.forward), [(9090, 9090), (8080, 8080), (9229, 9229)]);
    assert_eq!(forwards(&api.reverse), [(9001, 9000)]);

    let worker = load(&CASES[1]);
    let ManifestTarget::Kubernetes(k) = &worker.target else { unreachable!() };
    assert_eq!(
        k.workload,
        Workload::Selector(vec![
            ("app.kubernetes.io/name".into(), "worker".into()),
            ("tier".into(), "jobs".into())
        ])
    );
    assert_eq!(k.dev.command, None, "a shell is what `devmount ssh` opens");
    assert_eq!(k.dev.workdir.as_deref(), Some("/app"), "sync's folder in the pod");
    assert!(!k.dev.persistent_volume.enabled);
    assert_eq!(k.timeout, Duration::from_secs(90));
    let env: Vec<(&str, &str)> = k.dev.environment.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(
        env,
        [
            ("QUEUE", "jobs"),
            ("RETRIES", "3"),
            ("DEBUG", "true"),
            ("GREETING", "hello: world # not a comment")
        ]
    );

    let legacy = load(&CASES[2]);
    let ManifestTarget::Kubernetes(k) = &legacy.target else { unreachable!() };
    assert_eq!(k.dev.container.as_deref(), Some("web"));
    assert_eq!(k.dev.command.as_deref(), Some("npm run dev"));
    assert_eq!(k.dev.security_context.run_as_non_root, Some(true));
    assert_eq!(k.dev.volumes, ["/home/web/.cache"]);
    assert_eq!(k.timeout, Duration::from_secs(120));
    assert_eq!(forwards(&legacy.forward), [(8080, 8080), (9229, 9229)]);
}

// `devmount init` as a user runs it.

/// What `devmount init --from-okteto FILE` prints: the case's notes, then what it wrote.
fn init_stderr(case: &Case, file: &str) -> String {
    let notes = read(&expected(case, "notes")).replace("okteto.yml:", &format!("{file}:"));
    let dev = converted(case).dev;
    let mut out: String = notes.lines().map(|n| format!("devmount: {n}\n")).collect();
    out.push_str(&format!("devmount: wrote devmount.yml from the dev container {dev} of {file}, less the fields named above; `devmount render -f DEPLOYMENT.yaml` shows the swap, `devmount up ./mnt` starts the session\n"));
    out
}

#[test]
fn cli_writes_the_golden_file_and_names_what_it_drops() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let case = &CASES[3];
    std::fs::copy(okteto_path(case), d.join("okteto.yml")).unwrap();

    let out = devmount(d, &["init", "--from-okteto"]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty());
    assert_eq!(read(&d.join(FILE_NAME)), read(&expected(case, "yml")));
    assert_eq!(String::from_utf8(out.stderr).unwrap(), init_stderr(case, "okteto.yml"));

    // Never over an existing devmount.yml without --force.
    std::fs::write(d.join(FILE_NAME), "# mine\n").unwrap();
    assert_eq!(
        failure(d, &["init", "--from-okteto"]),
        "devmount.yml already exists; edit it, or give --force to replace it"
    );
    assert_eq!(failure(d, &["init"]), "devmount.yml already exists; edit it, or give --force to replace it");
    assert_eq!(read(&d.join(FILE_NAME)), "# mine\n");
    let out = devmount(d, &["init", "--from-okteto", "okteto.yml", "--force"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(read(&d.join(FILE_NAME)), read(&expected(case, "yml")));

    // The file it wrote is one `devmount render` takes for the Deployment it names.
    let deployment =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kube/deployments/minimal.yaml");
    let out = devmount(d, &["render", "-f", deployment.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let rendered = String::from_utf8(out.stdout).unwrap();
    assert!(rendered.contains("- --allow-forward\n        - \"8000\"\n"), "{rendered}");

    // The plain starter file is still there, with --force too.
    let out = devmount(d, &["init", "--force"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(read(&d.join(FILE_NAME)), devmount::manifest::STARTER);
}

#[test]
fn cli_picks_a_dev_container_or_says_which_there_are() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::copy(okteto_path(&CASES[0]), d.join("shop.yml")).unwrap();

    assert_eq!(
        failure(d, &["init", "--from-okteto", "shop.yml"]),
        "shop.yml:13:1: dev has several dev containers (api, worker); pick one with --dev NAME"
    );
    assert_eq!(
        failure(d, &["init", "--from-okteto", "shop.yml", "--dev", "db"]),
        "shop.yml:13:1: dev has no dev container \"db\"; give --dev one of: api, worker"
    );
    assert!(!d.join(FILE_NAME).exists(), "nothing is written on an error");

    let out = devmount(d, &["init", "--from-okteto", "shop.yml", "--dev", "worker"]);
    assert!(out.status.success(), "{out:?}");
    let want = read(&expected(&CASES[1], "yml")).replace("of okteto.yml", "of shop.yml");
    assert_eq!(read(&d.join(FILE_NAME)), want);
    assert_eq!(String::from_utf8(out.stderr).unwrap(), init_stderr(&CASES[1], "shop.yml"));
}

#[test]
fn cli_errors_are_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    assert_eq!(
        failure(d, &["init", "--from-okteto"]),
        "okteto.yml does not exist; give the okteto manifest's path: --from-okteto FILE"
    );
    std::fs::write(d.join("okteto.yml"), "dev:\n  api:\n    forward: [\"8080\"]\n").unwrap();
    assert_eq!(
        failure(d, &["init", "--from-okteto"]),
        "okteto.yml:3:15: forward \"8080\" is not LOCAL:REMOTE; write two ports, e.g. \"8080:8080\""
    );
    std::fs::write(d.join("okteto.yml"), "dev:\n  api: {image: [x}\n").unwrap();
    assert!(failure(d, &["init", "--from-okteto"]).starts_with("okteto.yml:2:"));
    std::fs::write(d.join("okteto.yml"), b"name: \xff\n").unwrap();
    assert!(failure(d, &["init", "--from-okteto"]).starts_with("cannot read okteto.yml: "));
    assert!(!d.join(FILE_NAME).exists());

    // --dev means nothing without --from-okteto: a usage error.
    let out = devmount(d, &["init", "--dev", "api"]);
    assert_eq!(out.status.code(), Some(255), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--from-okteto"), "{out:?}");
}

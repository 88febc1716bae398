//! Golden files for the Kubernetes swap. Each case renders a fixture Deployment
//! (`fixtures/kube/deployments/`) with a fixture manifest (`fixtures/kube/manifests/`, or none)
//! into exactly `fixtures/kube/expected/CASE.yaml`, which is what `devmount render` prints; and
//! restoring the dev Deployment gives back the original, byte for byte once both are written by
//! the same YAML writer.
//!
//! After a deliberate change to the swap, regenerate the expected files with
//! `DEVMOUNT_BLESS=1 cargo test -p devmount --test kube_render` and review their diff.

mod cli;

use std::path::{Path, PathBuf};

use cli::{devmount, failure, Golden};
use devmount::kube::render;
use devmount::kube::translate::{self, Session, SessionId};
use devmount::manifest::Manifest;
use k8s_openapi::api::apps::v1::Deployment;

struct Case {
    name: &'static str,
    deployment: &'static str,
    manifest: Option<&'static str>,
}

const CASES: &[Case] = &[
    // Init container, configMap volumes, fsGroup, user 1337 with capabilities, env, resources,
    // probes, RollingUpdate with 2 replicas, a sidecar; the defaults.
    Case { name: "web-defaults", deployment: "web", manifest: None },
    // The same Deployment with every override of the manifest.
    Case { name: "web-manifest", deployment: "web", manifest: Some("web") },
    Case { name: "minimal", deployment: "minimal", manifest: None },
    // Three containers, the second picked by a selector manifest; serverImage, no volume.
    Case { name: "several", deployment: "several", manifest: Some("several") },
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kube")
}

fn deployment_path(case: &Case) -> PathBuf {
    fixtures().join(format!("deployments/{}.yaml", case.deployment))
}

fn manifest_path(case: &Case) -> Option<PathBuf> {
    case.manifest.map(|m| fixtures().join(format!("manifests/{m}.yml")))
}

fn expected_path(case: &Case) -> PathBuf {
    fixtures().join(format!("expected/{}.yaml", case.name))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn manifest(case: &Case) -> Option<Manifest> {
    manifest_path(case).map(|p| Manifest::load(&p).unwrap_or_else(|e| panic!("{e}")))
}

fn rendered(case: &Case) -> String {
    let manifest = manifest(case);
    let text = read(&deployment_path(case));
    render::render(&text, &deployment_path(case), manifest.as_ref(), &render::session(manifest.as_ref()))
        .unwrap_or_else(|e| panic!("{}: {e:#}", case.name))
}

/// The documents of a YAML stream, as JSON values.
fn documents(text: &str) -> Vec<serde_json::Value> {
    serde_saphyr::from_multiple(text).expect("valid YAML")
}

/// The one Deployment among `text`'s documents.
fn deployment_in(text: &str) -> Deployment {
    let mut found = documents(text).into_iter().filter(|d| d["kind"] == "Deployment");
    let deployment = found.next().expect("a Deployment");
    assert!(found.next().is_none(), "one Deployment");
    serde_json::from_value(deployment).expect("a valid Deployment")
}

fn yaml(deployment: &Deployment) -> String {
    render::yaml(deployment).expect("writable as YAML")
}

#[test]
fn golden_files() {
    let mut golden = Golden::new();
    for case in CASES {
        golden.check(&expected_path(case), &rendered(case));
    }
    golden.finish("rendered YAML");
}

#[test]
fn restore_gives_back_the_original() {
    for case in CASES {
        let original = deployment_in(&read(&deployment_path(case)));
        let manifest = manifest(case);
        let settings = match manifest.as_ref().map(|m| &m.target) {
            Some(devmount::manifest::ManifestTarget::Kubernetes(k)) => k.dev.clone(),
            _ => Default::default(),
        };
        let dev = translate::translate(&original, &settings, &render::session(manifest.as_ref()))
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert_ne!(yaml(&dev.deployment), yaml(&original), "{}: the swap changes something", case.name);
        let restored = translate::restore(&dev.deployment).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert_eq!(yaml(&restored), yaml(&original), "{}: restore(translate(d)) == d", case.name);

        // Through YAML too: the dev Deployment as the golden file holds it (and as the cluster
        // would hand it back) restores to the original less the fields render leaves out.
        let golden = deployment_in(&read(&expected_path(case)));
        let restored = translate::restore(&golden).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let mut expected = original.clone();
        expected.metadata.resource_version = None;
        expected.metadata.uid = None;
        expected.metadata.generation = None;
        expected.metadata.creation_timestamp = None;
        expected.status = None;
        assert_eq!(yaml(&restored), yaml(&expected), "{}: restore(golden) == d", case.name);
        assert_eq!(restored.spec, original.spec, "{}: the spec exactly", case.name);
    }
}

#[test]
fn session_inputs_reach_the_output() {
    let original = deployment_in(&read(&fixtures().join("deployments/minimal.yaml")));
    let session = Session {
        id: SessionId::new("a1b2c3").unwrap(),
        authorized_key:
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGrAi1SFWbSOGhMMKBgFfBt3Iw2t7ztm1KeB8RxZLCNk me@laptop"
                .into(),
        port: 40123,
        allow_forward: vec![8000],
        allow_reverse: vec![],
    };
    let dev = translate::translate(&original, &Default::default(), &session).unwrap();
    let text = render::to_yaml(&dev).unwrap();
    assert!(text.contains("devmount.dev/session: a1b2c3\n"), "{text}");
    assert!(text.contains("name: devmount-a1b2c3\n"), "{text}");
    assert!(text.contains("- 127.0.0.1:40123\n"), "{text}");
    assert!(text.contains("- --allow-forward\n        - \"8000\"\n"), "{text}");
    assert!(
        text.contains("authorized_keys: |\n    ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGrAi1SFWbSOGhMMKBgFfBt3Iw2t7ztm1KeB8RxZLCNk me@laptop\n"),
        "{text}"
    );
    assert!(text.contains(&format!("host_key: {}\n", translate::HOST_KEY_PLACEHOLDER)), "{text}");
    assert_eq!(translate::session_of(&dev.deployment), Some("a1b2c3"));
    assert_eq!(translate::session_of(&original), None);
}

// `devmount render` as a user runs it.

#[test]
fn cli_prints_the_golden_files() {
    let dir = tempfile::tempdir().unwrap();
    for case in CASES {
        let file = deployment_path(case);
        let mut args = vec!["render", "-f", file.to_str().unwrap()];
        let manifest = manifest_path(case);
        if let Some(m) = &manifest {
            args.extend(["-m", m.to_str().unwrap()]);
        }
        let out = devmount(dir.path(), &args);
        assert!(out.status.success(), "{}: {out:?}", case.name);
        assert_eq!(String::from_utf8(out.stdout).unwrap(), read(&expected_path(case)), "{}", case.name);
    }

    // ./devmount.yml is the manifest when -m is not given.
    let case = &CASES[1];
    std::fs::copy(manifest_path(case).unwrap(), dir.path().join("devmount.yml")).unwrap();
    let out = devmount(dir.path(), &["render", "-f", deployment_path(case).to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8(out.stdout).unwrap(), read(&expected_path(case)));
}

#[test]
fn cli_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let write = |name: &str, text: &str| {
        std::fs::write(d.join(name), text).unwrap();
    };
    let minimal = read(&fixtures().join("deployments/minimal.yaml"));

    write("service.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {}\n");
    assert_eq!(
        failure(d, &["render", "-f", "service.yaml"]),
        "service.yaml holds no Deployment, only: Service; give the Deployment's YAML, e.g. from `kubectl get deployment NAME -o yaml`"
    );
    write("empty.yaml", "# nothing\n");
    assert!(failure(d, &["render", "-f", "empty.yaml"]).starts_with("empty.yaml holds no Deployment; give"));

    write("no-container.yml", "target:\n  kubernetes:\n    deployment: hello\n    container: nope\n");
    write("minimal.yaml", &minimal);
    assert_eq!(
        failure(d, &["render", "-f", "minimal.yaml", "-m", "no-container.yml"]),
        "minimal.yaml: deployment/hello has no container \"nope\"; set kubernetes.container to one of: hello"
    );
    write("local.yml", "target:\n  local: .\n");
    assert_eq!(
        failure(d, &["render", "-f", "minimal.yaml", "-m", "local.yml"]),
        "local.yml: the target is local; `devmount render` needs `target: kubernetes: {...}` (see docs/manifest.md)"
    );
    write("other.yml", "target:\n  kubernetes: {deployment: web}\n");
    assert_eq!(
        failure(d, &["render", "-f", "minimal.yaml", "-m", "other.yml"]),
        "minimal.yaml holds no Deployment matching the manifest's deployment/web, only: Deployment hello; give the Deployment's YAML, e.g. from `kubectl get deployment NAME -o yaml`"
    );
    write("ns.yml", "target:\n  kubernetes: {deployment: web, namespace: dev}\n");
    let web = deployment_path(&CASES[0]);
    assert!(failure(d, &["render", "-f", web.to_str().unwrap(), "-m", "ns.yml"])
        .ends_with("web.yaml: the Deployment is in namespace shop, the manifest's kubernetes.namespace is dev; make them agree"));
    write("bad-manifest.yml", "target:\n  kubernetes:\n    deployment: hello\n    image: [x]\n");
    assert_eq!(
        failure(d, &["render", "-f", "minimal.yaml", "-m", "bad-manifest.yml"]),
        "bad-manifest.yml:4:12: a list where a single value belongs"
    );

    write("old.yaml", &minimal.replace("apps/v1", "extensions/v1beta1"));
    assert_eq!(
        failure(d, &["render", "-f", "old.yaml"]),
        "old.yaml:1: a Deployment of apiVersion \"extensions/v1beta1\"; devmount reads apps/v1, as `kubectl get deployment NAME -o yaml` prints it"
    );
    write("typo.yaml", &minimal.replace("  selector:", "  selectr:"));
    assert_eq!(
        failure(d, &["render", "-f", "typo.yaml"]),
        "typo.yaml: the Deployment's spec.selectr is not a field devmount knows (Kubernetes 1.37); fix its name, or remove it: the swap would lose it"
    );
    write("two.yaml", &format!("{minimal}---\n{}", minimal.replace("name: hello\n", "name: hello2\n")));
    assert_eq!(
        failure(d, &["render", "-f", "two.yaml"]),
        "two.yaml holds several Deployments (hello, hello2); name one with kubernetes.deployment in the manifest"
    );
    // A mistake in the second document is placed on the file's own line.
    write(
        "wrong-type.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: a}}\n---\n{}",
            minimal.replace("image: busybox:1.37", "image: [busybox]")
        ),
    );
    assert!(failure(d, &["render", "-f", "wrong-type.yaml"]).starts_with("wrong-type.yaml:20:16: "));
    write("broken.yaml", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x\n");
    assert!(failure(d, &["render", "-f", "broken.yaml"]).starts_with("broken.yaml:3:11: "));
    write("dev.yaml", &read(&expected_path(&CASES[2])));
    assert_eq!(
        failure(d, &["render", "-f", "dev.yaml"]),
        "dev.yaml: deployment/hello is already in dev mode (session render); `devmount down` restores it before another swap"
    );
    assert!(failure(d, &["render", "-f", "missing.yaml"]).starts_with("cannot read missing.yaml: "));
}

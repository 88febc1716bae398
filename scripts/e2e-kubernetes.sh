#!/usr/bin/env bash
# The whole Kubernetes flow on a real cluster (kind, k3d, minikube, or any kubeconfig whose
# current context, or --context NAME, may create Deployments in a namespace): deploys a
# busybox-based sample app, `devmount up`, edits through the mount, checks that `devmount exec`
# sees the edit and that a forwarded port answers, then `devmount down` and checks that the
# Deployment is exactly as it was. Not run in CI (there is no cluster there).
#
#   scripts/e2e-kubernetes.sh [--context NAME] [--namespace NS]
#
# Needs kubectl, curl, jq, FUSE (scripts/setup), an amd64 node, and the builds:
# `cargo build --workspace --bins && scripts/build-static-server`. The namespace (default:
# devmount-e2e, created if missing) is deleted at the end only if this script created it.
set -euo pipefail

cd "$(dirname "$0")/.."
context=() namespace=devmount-e2e
while (($#)); do
    case "$1" in
        --context) context=(--context "$2"); shift 2 ;;
        --namespace) namespace=$2; shift 2 ;;
        *) echo "usage: $0 [--context NAME] [--namespace NS]" >&2; exit 2 ;;
    esac
done
bin="${CARGO_TARGET_DIR:-$PWD/target}/debug"
devmount="$bin/devmount"
[[ -x $devmount ]] || { echo "$devmount is missing: cargo build --workspace --bins" >&2; exit 1; }
kc() { kubectl "${context[@]}" -n "$namespace" "$@"; }
step() { printf '\n==> %s\n' "$*"; }

work=$(mktemp -d)
created_namespace=
cleanup() {
    set +e
    if mountpoint -q "$work/mnt"; then (cd "$work" && "$devmount" down "$work/mnt" --force); fi
    kc delete deployment sample --ignore-not-found >/dev/null
    kc delete pvc devmount-sample-app --ignore-not-found >/dev/null
    if [[ -n $created_namespace ]]; then kubectl "${context[@]}" delete namespace "$namespace" --wait=false; fi
    rm -rf "$work"
}
trap cleanup EXIT

if ! kubectl "${context[@]}" get namespace "$namespace" >/dev/null 2>&1; then
    kubectl "${context[@]}" create namespace "$namespace"
    created_namespace=1
fi

step "deploying the sample app (busybox httpd serving /srv)"
kc apply -f - <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata:
  name: sample
  labels: {app: sample}
spec:
  replicas: 2
  selector: {matchLabels: {app: sample}}
  template:
    metadata: {labels: {app: sample}}
    spec:
      containers:
      - name: app
        image: busybox:1.36
        command: ["sh", "-c", "mkdir -p /srv && echo original > /srv/index.html && exec httpd -f -p 8080 -h /srv"]
        workingDir: /srv
        ports: [{containerPort: 8080}]
        readinessProbe: {tcpSocket: {port: 8080}}
EOF
kc rollout status deployment/sample --timeout=180s
kc get deployment sample -o json | jq -S '{spec: .spec, labels: .metadata.labels}' > "$work/before.json"

step "devmount up"
mkdir -p "$work/mnt"
ctx_line=""
if ((${#context[@]})); then ctx_line="    context: ${context[1]}"; fi
cat > "$work/devmount.yml" <<EOF
target:
  kubernetes:
    namespace: $namespace
    deployment: sample
    container: app
    workdir: /srv
    command: httpd -f -p 8080 -h /srv
    timeout: 5m
$ctx_line
forward: ["18080:8080"]
EOF
(cd "$work" && "$devmount" up "$work/mnt" -v)

step "editing through the mount; devmount exec sees it"
echo "edited through devmount" > "$work/mnt/index.html"
seen=$(cd "$work/mnt" && "$devmount" exec -T cat index.html)
[[ $seen == "edited through devmount" ]] || { echo "exec saw: $seen" >&2; exit 1; }

step "the forwarded port answers"
answer=""
for _ in $(seq 50); do
    answer=$(curl -fsS http://127.0.0.1:18080/index.html 2>/dev/null) && break
    sleep 0.2
done
[[ $answer == "edited through devmount" ]] || { echo "the forward answered: $answer" >&2; exit 1; }

step "devmount down restores the Deployment"
(cd "$work" && "$devmount" down "$work/mnt" --volumes)
kc get deployment sample -o json | jq -S '{spec: .spec, labels: .metadata.labels}' > "$work/after.json"
diff -u "$work/before.json" "$work/after.json"
if kc get secrets -l devmount.dev/session -o name | grep -q .; then
    echo "a session Secret is left" >&2
    exit 1
fi
kc rollout status deployment/sample --timeout=180s
echo
echo "e2e-kubernetes: ok"

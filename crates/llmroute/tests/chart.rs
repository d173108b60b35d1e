//! The Helm chart in `charts/llmroute`, checked with the real helm (built by `scripts/helm`) and,
//! for the cluster test, the real API server of `scripts/k8s-testenv`.
//!
//! The tests that run helm are `#[ignore]`d, because the first build of helm needs Go and the Go
//! module proxy. `scripts/test` builds it, sets `LLMROUTE_TEST_HELM` and runs them. Without that
//! variable they run `scripts/helm`, which builds helm on first use.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    ENCODER, eventually, free_port, kubeconfig, kubectl, kubectl_json, kubectl_ok, repository, run,
    stdout_of_success,
};
use llmroute_operator::install::{InstallOptions, manifests};
use serde_json::{Value, json};

fn chart() -> String {
    repository()
        .join("charts/llmroute")
        .to_string_lossy()
        .into_owned()
}

fn helm_program() -> String {
    std::env::var("LLMROUTE_TEST_HELM").unwrap_or_else(|_| {
        repository()
            .join("scripts/helm")
            .to_string_lossy()
            .into_owned()
    })
}

fn helm(args: &[&str]) -> Output {
    run(&helm_program(), args, None)
}

/// Runs helm and returns its standard output, or panics with its standard error.
fn helm_ok(args: &[&str]) -> String {
    stdout_of_success("helm", args, helm(args))
}

/// Parses a YAML stream into its documents, skipping empty ones.
fn documents(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|document| Value::deserialize(document).expect("helm renders valid YAML"))
        .filter(|document| !document.is_null())
        .collect()
}

/// Renders the chart with `sets` (`--set` arguments) in `namespace`.
fn template(namespace: &str, sets: &[&str]) -> Vec<Value> {
    let chart = chart();
    let mut args = vec![
        "template",
        "llmroute",
        chart.as_str(),
        "--namespace",
        namespace,
    ];
    for set in sets {
        args.extend(["--set", set]);
    }
    documents(&helm_ok(&args))
}

/// Removes what only the chart adds (Helm's labels and the CRDs' keep annotation), so that
/// the chart's objects can be compared with `llmroute install`'s. Numbers become floats,
/// because helm renders the CRDs through `fromYaml`, which reads every number as a float.
fn normalize(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for key in ["labels", "annotations"] {
                if let Some(Value::Object(entries)) = map.get_mut(key) {
                    entries.remove("helm.sh/chart");
                    entries.remove("app.kubernetes.io/instance");
                    entries.remove("app.kubernetes.io/version");
                    entries.remove("helm.sh/resource-policy");
                    if entries.get("app.kubernetes.io/managed-by") == Some(&json!("Helm")) {
                        entries.remove("app.kubernetes.io/managed-by");
                    }
                    if entries.is_empty() {
                        map.remove(key);
                    }
                }
            }
            map.values_mut().for_each(normalize);
        }
        Value::Array(items) => items.iter_mut().for_each(normalize),
        Value::Number(number) => {
            *value = json!(number.as_f64().unwrap());
        }
        _ => {}
    }
}

/// Objects by `kind/namespace/name`.
fn by_key(objects: Vec<Value>) -> BTreeMap<String, Value> {
    objects
        .into_iter()
        .map(|mut object| {
            normalize(&mut object);
            let key = format!(
                "{}/{}/{}",
                object["kind"].as_str().unwrap(),
                object["metadata"]["namespace"].as_str().unwrap_or(""),
                object["metadata"]["name"].as_str().unwrap()
            );
            (key, object)
        })
        .collect()
}

fn assert_same_objects(chart: Vec<Value>, options: &InstallOptions) {
    // The chart leaves the namespace to `helm install --create-namespace`.
    let installed: Vec<Value> = manifests(options)
        .into_iter()
        .filter(|object| object["kind"] != "Namespace")
        .collect();
    let chart = by_key(chart);
    let installed = by_key(installed);
    assert_eq!(
        chart.keys().collect::<Vec<_>>(),
        installed.keys().collect::<Vec<_>>(),
        "the chart and `llmroute install` render different objects"
    );
    for (key, object) in &chart {
        assert!(
            object == &installed[key],
            "{key} differs.\nchart:\n{}\nllmroute install:\n{}",
            serde_yaml_ng::to_string(object).unwrap(),
            serde_yaml_ng::to_string(&installed[key]).unwrap()
        );
    }
}

#[test]
fn chart_crds_are_the_checked_in_crds() {
    let checked_in = std::fs::read_to_string(repository().join("crds/llmroute.yaml")).unwrap();
    let copy =
        std::fs::read_to_string(repository().join("charts/llmroute/files/crds.yaml")).unwrap();
    assert!(
        copy == checked_in,
        "charts/llmroute/files/crds.yaml differs from crds/llmroute.yaml; it must be a symbolic link to ../../../crds/llmroute.yaml"
    );
}

#[test]
fn chart_version_is_the_crate_version() {
    let text = std::fs::read_to_string(repository().join("charts/llmroute/Chart.yaml")).unwrap();
    let chart: Value = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(chart["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(chart["appVersion"], env!("CARGO_PKG_VERSION"));
}

#[test]
#[ignore = "needs helm from scripts/helm; scripts/test builds it and runs this"]
fn chart_defaults_match_llmroute_install() {
    assert_same_objects(template("llmroute-system", &[]), &InstallOptions::default());
}

#[test]
#[ignore = "needs helm from scripts/helm; scripts/test builds it and runs this"]
fn chart_settings_match_llmroute_install() {
    let chart = template(
        "ops",
        &[
            "image.repository=registry.example/llmroute",
            "image.tag=1.2.3",
            "replicas=3",
            "webhook.failurePolicy=Fail",
            "webhook.timeoutSeconds=10",
            "sidecar.image=registry.example/llmroute-sidecar:1.2.3",
            "sidecar.cpuRequest=250m",
            "sidecar.memoryRequest=300Mi",
            "sidecar.mode=native",
            "sidecar.adminPort=9100",
            "sidecar.imagePullSecrets={registry,mirror}",
            "persistence.size=5Gi",
            "persistence.storageClass=fast-ssd",
            "events.maxAgeDays=7",
            "events.maxPerRoute=50000",
            "events.maxStoreSize=4Gi",
            "learning.intervalSeconds=0",
        ],
    );
    let options = InstallOptions {
        namespace: "ops".into(),
        image: "registry.example/llmroute:1.2.3".into(),
        replicas: 3,
        webhook_failure_policy: "Fail".into(),
        webhook_timeout_seconds: 10,
        sidecar_image: Some("registry.example/llmroute-sidecar:1.2.3".into()),
        sidecar_cpu: "250m".into(),
        sidecar_memory: "300Mi".into(),
        sidecar_mode: "native".into(),
        sidecar_admin_port: 9100,
        sidecar_image_pull_secrets: vec!["registry".into(), "mirror".into()],
        storage_size: "5Gi".into(),
        storage_class: Some("fast-ssd".into()),
        event_max_age_days: 7,
        event_max_per_route: 50_000,
        event_max_store_size: "4Gi".into(),
        learning_interval_seconds: 0,
        ..InstallOptions::default()
    };
    assert_same_objects(chart, &options);
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered chart"))
}

fn container_args(objects: &[Value]) -> Vec<String> {
    let set = find(objects, "StatefulSet", "llmroute-operator");
    serde_json::from_value(set["spec"]["template"]["spec"]["containers"][0]["args"].clone())
        .unwrap()
}

#[test]
#[ignore = "needs helm from scripts/helm; scripts/test builds it and runs this"]
fn chart_lints_with_each_value_set() {
    let chart = chart();
    let value_sets: [&[&str]; 4] = [
        &[],
        &[
            "metrics.serviceMonitor.enabled=true",
            "metrics.podMonitor.enabled=true",
            "persistence.enabled=false",
        ],
        &[
            "webhook.certificate.source=certManager",
            "webhook.certificate.certManager.issuerRef.name=selfsigned",
        ],
        &[
            "webhook.certificate.source=secret",
            "webhook.certificate.secretName=webhook-tls",
            "webhook.certificate.caBundle=LS0tLS1CRUdJTg==",
        ],
    ];
    for sets in value_sets {
        let mut args = vec!["lint", "--strict", chart.as_str()];
        for set in sets {
            args.extend(["--set", set]);
        }
        helm_ok(&args);
    }
}

#[test]
#[ignore = "needs helm from scripts/helm; scripts/test builds it and runs this"]
fn chart_optional_objects_follow_values() {
    let defaults = template("llmroute-system", &[]);
    assert!(!defaults.iter().any(|o| o["kind"] == "ServiceMonitor"));
    assert!(!defaults.iter().any(|o| o["kind"] == "PodMonitor"));
    assert!(!defaults.iter().any(|o| o["kind"] == "Certificate"));
    let set = find(&defaults, "StatefulSet", "llmroute-operator");
    assert_eq!(
        set["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"],
        "1Gi"
    );
    let spread = &set["spec"]["template"]["spec"]["topologySpreadConstraints"][0];
    assert_eq!(spread["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(spread["whenUnsatisfiable"], "ScheduleAnyway");
    assert_eq!(
        spread["labelSelector"]["matchLabels"],
        set["spec"]["selector"]["matchLabels"]
    );
    let packed = template("llmroute-system", &["spreadAcrossNodes=false"]);
    let set = find(&packed, "StatefulSet", "llmroute-operator");
    assert!(set["spec"]["template"]["spec"]["topologySpreadConstraints"].is_null());
    assert!(set["spec"]["template"]["spec"]["volumes"].is_null());
    let crd = find(
        &defaults,
        "CustomResourceDefinition",
        "llmroutes.llmroute.dev",
    );
    assert_eq!(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
        "uninstall keeps the CRDs and so every route"
    );

    let monitored = template(
        "llmroute-system",
        &[
            "metrics.serviceMonitor.enabled=true",
            "metrics.serviceMonitor.labels.release=prometheus",
            "persistence.enabled=false",
            "crds.install=false",
        ],
    );
    let monitor = find(&monitored, "ServiceMonitor", "llmroute-operator");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert!(!monitored.iter().any(|o| o["kind"] == "PodMonitor"));

    // The sidecars' PodMonitor scrapes the admin port the webhook names on injected pods.
    let sidecars = template(
        "llmroute-system",
        &[
            "metrics.podMonitor.enabled=true",
            "metrics.podMonitor.labels.release=prometheus",
        ],
    );
    let monitor = find(&sidecars, "PodMonitor", "llmroute-sidecars");
    assert_eq!(
        monitor["spec"]["podMetricsEndpoints"][0]["port"],
        llmroute_operator::webhook::ADMIN_PORT_NAME
    );
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"]
            [llmroute_operator::webhook::inject::INJECTION_LABEL],
        "injected"
    );
    assert_eq!(monitor["spec"]["namespaceSelector"]["any"], true);
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert!(
        !monitored
            .iter()
            .any(|o| o["kind"] == "CustomResourceDefinition")
    );
    let set = find(&monitored, "StatefulSet", "llmroute-operator");
    assert!(set["spec"]["volumeClaimTemplates"].is_null());
    assert_eq!(
        set["spec"]["template"]["spec"]["volumes"],
        json!([{"name": "data", "emptyDir": {}}])
    );

    let cert_manager = template(
        "ops",
        &[
            "webhook.certificate.source=certManager",
            "webhook.certificate.certManager.issuerRef.name=cluster-ca",
            "webhook.certificate.certManager.issuerRef.kind=ClusterIssuer",
        ],
    );
    let certificate = find(&cert_manager, "Certificate", "llmroute-operator-webhook");
    assert_eq!(certificate["spec"]["issuerRef"]["name"], "cluster-ca");
    assert_eq!(
        certificate["spec"]["dnsNames"][0],
        "llmroute-operator-webhook.ops.svc"
    );
    let configuration = find(
        &cert_manager,
        "MutatingWebhookConfiguration",
        "llmroute-sidecar-injector",
    );
    assert_eq!(
        configuration["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "ops/llmroute-operator-webhook"
    );
    let args = container_args(&cert_manager);
    assert!(
        args.contains(&"--webhook-cert-dir=/etc/llmroute/webhook-tls".to_string()),
        "{args:?}"
    );
    let set = find(&cert_manager, "StatefulSet", "llmroute-operator");
    assert_eq!(
        set["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"],
        "llmroute-webhook-cert-manager"
    );

    let own_secret = template(
        "ops",
        &[
            "webhook.certificate.source=secret",
            "webhook.certificate.secretName=webhook-tls",
            "webhook.certificate.caBundle=LS0tLS1CRUdJTg==",
        ],
    );
    let configuration = find(
        &own_secret,
        "MutatingWebhookConfiguration",
        "llmroute-sidecar-injector",
    );
    assert_eq!(
        configuration["webhooks"][0]["clientConfig"]["caBundle"],
        "LS0tLS1CRUdJTg=="
    );
    assert!(!own_secret.iter().any(|o| o["kind"] == "Certificate"));

    let pinned = template("ops", &[&format!("sidecar.encoderDigest={ENCODER}")]);
    assert!(container_args(&pinned).contains(&format!("--encoder-digest={ENCODER}")));
}

#[test]
#[ignore = "needs helm from scripts/helm; scripts/test builds it and runs this"]
fn chart_rejects_invalid_values_by_name() {
    let chart = chart();
    let cases: [(&[&str], &str); 14] = [
        (&["replicas=0"], "/replicas"),
        (
            &["webhook.failurePolicy=Sometimes"],
            "/webhook/failurePolicy",
        ),
        (&["webhook.timeoutSeconds=31"], "/webhook/timeoutSeconds"),
        (&["persistence.size=lots"], "/persistence/size"),
        (&["sidecar.mode=sometimes"], "/sidecar/mode"),
        (&["sidecar.cpuRequest=fast"], "/sidecar/cpuRequest"),
        (&["sidecar.encoderDigest=abc"], "/sidecar/encoderDigest"),
        (&["sidecar.adminPort=70000"], "/sidecar/adminPort"),
        (
            &["sidecar.imagePullSecrets={Registry_Key}"],
            "/sidecar/imagePullSecrets/0",
        ),
        (
            &["metrics.podMonitor.enabled=true", "sidecar.adminPort=0"],
            "metrics.podMonitor.enabled needs sidecar.adminPort above 0",
        ),
        (
            &["learning.intervalSeconds=-1"],
            "/learning/intervalSeconds",
        ),
        (&["replica=3"], "replica"),
        (
            &["webhook.certificate.source=secret"],
            "/webhook/certificate/secretName",
        ),
        (
            &["webhook.certificate.source=certManager"],
            "/webhook/certificate/certManager/issuerRef/name",
        ),
    ];
    for (sets, named) in cases {
        let mut args = vec!["template", "llmroute", chart.as_str()];
        for set in sets {
            args.extend(["--set", set]);
        }
        let output = helm(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "helm accepted {sets:?}:\n{}",
            String::from_utf8_lossy(&output.stdout)
        );
        assert!(
            stderr.contains(named),
            "the error for {sets:?} does not name {named}:\n{stderr}"
        );
    }
}

// === The chart on a real API server ===

/// Writes a copy of the test kubeconfig that acts as `user` in `groups` (impersonation), so that the
/// operator runs with exactly the chart's RBAC.
fn impersonating_kubeconfig(dir: &Path, user: &str, groups: &[&str]) -> PathBuf {
    let text = std::fs::read_to_string(kubeconfig()).unwrap();
    let mut config: Value = serde_yaml_ng::from_str(&text).unwrap();
    for entry in config["users"].as_array_mut().unwrap() {
        entry["user"]["as"] = json!(user);
        entry["user"]["as-groups"] = json!(groups);
    }
    let path = dir.join("kubeconfig");
    std::fs::write(&path, serde_yaml_ng::to_string(&config).unwrap()).unwrap();
    path
}

/// `llmroute operator` running as a child process; stopped with SIGTERM when dropped.
struct OperatorProcess {
    child: std::process::Child,
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Creates a pod annotated for the route `chat` as a server-side dry run, and returns it as the
/// API server would store it, after the webhook.
fn dry_run_pod(namespace: &str, name: &str) -> Option<Value> {
    let output = kubectl(
        &[
            "-n",
            namespace,
            "run",
            name,
            "--image=busybox",
            "--restart=Never",
            "--annotations=llmroute.dev/route=chat",
            "--dry-run=server",
            "-o",
            "json",
        ],
        None,
    );
    serde_json::from_slice(&output.stdout).ok()
}

fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// Starts the operator binary with the arguments of the installed StatefulSet's container.
/// Only what a pod gets from Kubernetes changes: the `$(POD_…)` variables, listen addresses on
/// 127.0.0.1 and a local data folder. The test server has no kube-proxy to reach a Service, so
/// the API server calls the webhook by URL, with a certificate for 127.0.0.1.
fn start_operator(
    namespace: &str,
    data: &Path,
    kubeconfig: &Path,
    webhook: u16,
) -> (OperatorProcess, u16) {
    let set = kubectl_json(&["-n", namespace, "get", "statefulset", "llmroute-operator"]);
    let args: Vec<String> =
        serde_json::from_value(set["spec"]["template"]["spec"]["containers"][0]["args"].clone())
            .unwrap();
    let (control, ops) = (free_port(), free_port());
    let mut local: Vec<String> = args
        .iter()
        .map(|arg| {
            let arg = arg
                .replace("$(POD_NAMESPACE)", namespace)
                .replace("$(POD_NAME)", "llmroute-operator-0")
                .replace("$(POD_IP)", "127.0.0.1");
            if let Some(rest) = arg.strip_prefix("--control-listen=") {
                assert!(rest.starts_with("[::]:"), "{arg}");
                format!("--control-listen=127.0.0.1:{control}")
            } else if arg.starts_with("--ops-listen=") {
                format!("--ops-listen=127.0.0.1:{ops}")
            } else if arg.starts_with("--webhook-listen=") {
                format!("--webhook-listen=127.0.0.1:{webhook}")
            } else if arg.starts_with("--data-dir=") {
                format!("--data-dir={}", data.display())
            } else {
                arg
            }
        })
        .collect();
    local.push(format!("--webhook-url=https://127.0.0.1:{webhook}/inject"));
    local.push("--webhook-hosts=127.0.0.1".into());
    let log = std::fs::File::create(data.join("operator.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_llmroute"))
        .args(&local)
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("llmroute operator starts");
    (OperatorProcess { child }, ops)
}

/// Replaces the webhook's Service in its configuration with `url`, or the URL with the chart's
/// Service when `url` is `None`.
fn point_webhook_at(url: Option<&str>, namespace: &str) {
    let patch = match url {
        Some(url) => json!([
            {"op": "remove", "path": "/webhooks/0/clientConfig/service"},
            {"op": "add", "path": "/webhooks/0/clientConfig/url", "value": url},
        ]),
        None => json!([
            {"op": "remove", "path": "/webhooks/0/clientConfig/url"},
            {"op": "add", "path": "/webhooks/0/clientConfig/service", "value": {
                "name": "llmroute-operator-webhook", "namespace": namespace,
                "path": "/inject", "port": 443,
            }},
        ]),
    };
    kubectl_ok(
        &[
            "patch",
            "mutatingwebhookconfiguration",
            "llmroute-sidecar-injector",
            "--type=json",
            "-p",
            &patch.to_string(),
        ],
        None,
    );
}

fn pvc_uids(namespace: &str) -> BTreeMap<String, String> {
    let list = kubectl_json(&["-n", namespace, "get", "persistentvolumeclaims"]);
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|claim| {
            (
                claim["metadata"]["name"].as_str().unwrap().to_string(),
                claim["metadata"]["uid"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

const APP_DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: app
spec:
  replicas: 1
  selector:
    matchLabels: {app: app}
  template:
    metadata:
      labels: {app: app}
      annotations:
        llmroute.dev/route: chat
    spec:
      containers:
        - name: app
          image: python:3.12-slim
          command: ["sleep", "infinity"]
"#;

const ROUTE: &str = r#"
apiVersion: llmroute.dev/v1alpha1
kind: LLMRoute
metadata:
  name: chat
spec:
  models:
    - name: small
      endpoint: http://127.0.0.1:9/v1
      model: small
      pricing: {inputUsdPerMillionTokens: 0.1, outputUsdPerMillionTokens: 0.4}
    - name: large
      endpoint: http://127.0.0.1:9/v1
      model: large
      pricing: {inputUsdPerMillionTokens: 2.5, outputUsdPerMillionTokens: 10}
  defaultPreference: {quality: 0.7, cost: 0.3}
  fallback: small
"#;

/// Installs the chart with helm, runs the operator with the installed arguments and RBAC,
/// serves a route, injects an annotated Deployment's pod, upgrades with changed values and
/// uninstalls, checking what each step keeps.
#[test]
#[ignore = "needs helm from scripts/helm and the API server of scripts/k8s-testenv; scripts/test runs it"]
fn chart_installs_serves_and_injects_on_a_real_api_server() {
    let suffix = std::process::id() % 100_000;
    let release_namespace = format!("chart-system-{suffix}");
    let app_namespace = format!("chart-app-{suffix}");
    let chart = chart();
    let config = kubeconfig();
    let digest = format!("sidecar.encoderDigest={ENCODER}");
    let install = |dry_run_flag: Option<&str>| {
        let mut args = vec![
            "install",
            "llmroute",
            chart.as_str(),
            "--kubeconfig",
            config.as_str(),
            "--namespace",
            release_namespace.as_str(),
            "--create-namespace",
            "--set",
            digest.as_str(),
            // Other cluster tests apply the CRDs and `llmroute install`'s cluster-wide objects
            // without Helm's ownership annotations; this release takes them over.
            "--take-ownership",
            "--force-conflicts",
        ];
        if let Some(flag) = dry_run_flag {
            args.push(flag);
        }
        helm_ok(&args)
    };

    // The rendered manifests pass the server's validation (a server-side dry run) first.
    let rendered = helm_ok(&[
        "template",
        "llmroute",
        chart.as_str(),
        "--namespace",
        release_namespace.as_str(),
        "--set",
        digest.as_str(),
    ]);
    // A run that stopped half-way may have left the configuration pointing at its URL, which
    // the chart's Service target cannot replace (see `point_webhook_at`).
    kubectl_ok(
        &[
            "delete",
            "mutatingwebhookconfiguration",
            "llmroute-sidecar-injector",
            "--ignore-not-found",
        ],
        None,
    );
    kubectl_ok(&["create", "namespace", &release_namespace], None);
    kubectl_ok(
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--dry-run=server",
            "--field-manager=llmroute-chart-test",
            "-f",
            "-",
        ],
        Some(&rendered),
    );
    install(Some("--dry-run=server"));
    install(None);

    // The StatefulSet controller creates one claim per replica.
    let claims = eventually("the event store's claims", || {
        let claims = pvc_uids(&release_namespace);
        (claims.len() == 2).then_some(claims)
    });
    assert_eq!(
        claims.keys().collect::<Vec<_>>(),
        ["data-llmroute-operator-0", "data-llmroute-operator-1"]
    );
    let claim = kubectl_json(&[
        "-n",
        &release_namespace,
        "get",
        "persistentvolumeclaim",
        "data-llmroute-operator-0",
    ]);
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "1Gi");

    // The operator with the installed arguments, as the installed service account.
    let data = tempfile::tempdir().unwrap();
    let account = format!("system:serviceaccount:{release_namespace}:llmroute-operator");
    let operator_config = impersonating_kubeconfig(
        data.path(),
        &account,
        &["system:serviceaccounts", "system:authenticated"],
    );
    // The chart's webhook configuration names the Service, so the test points it at the
    // operator's URL, as the operator's `--webhook-url` does. Server-side apply cannot swap one
    // for the other, because it would keep both fields.
    let webhook = free_port();
    let url = format!("https://127.0.0.1:{webhook}/inject");
    point_webhook_at(Some(&url), &release_namespace);
    let (operator, ops) =
        start_operator(&release_namespace, data.path(), &operator_config, webhook);
    let log = data.path().join("operator.log");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually("the operator to lead", || {
        let (_, body) = http_get(ops, "/metrics")?;
        body.lines()
            .any(|l| l == "llmroute_operator_leader 1")
            .then_some(())
    });
    // Ready once the webhook's certificate, which the leader creates, is loaded too.
    eventually("the operator to be ready", || {
        (http_get(ops, "/readyz").map(|r| r.0) == Some(200)).then_some(())
    });
    assert_eq!(
        http_get(ops, "/readyz").map(|r| r.0),
        Some(200),
        "{}",
        log_text()
    );

    // A route becomes ready and an annotated Deployment's pod gets the sidecar.
    kubectl_ok(&["create", "namespace", &app_namespace], None);
    kubectl_ok(&["-n", &app_namespace, "apply", "-f", "-"], Some(ROUTE));
    eventually("the route to be Ready", || {
        let route = kubectl_json(&["-n", &app_namespace, "get", "llmroutes", "chat"]);
        route["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
            .then_some(())
    });
    // The leader creates the webhook's certificate after it is elected, and until the webhook
    // serves it the API server creates pods without the sidecar (failure policy Ignore). A
    // server-side dry run of an annotated pod shows when injection works.
    eventually("the webhook to inject a dry-run pod", || {
        let pod = dry_run_pod(&app_namespace, "probe")?;
        let injected = pod["spec"]["initContainers"]
            .as_array()?
            .iter()
            .any(|c| c["name"] == "llmroute-sidecar");
        injected.then_some(())
    });
    kubectl_ok(
        &["-n", &app_namespace, "apply", "-f", "-"],
        Some(APP_DEPLOYMENT),
    );
    let pod = eventually("the Deployment's pod", || {
        let pods = kubectl_json(&["-n", &app_namespace, "get", "pods", "-l", "app=app"]);
        pods["items"].as_array()?.first().cloned()
    });
    assert_eq!(
        pod["metadata"]["labels"]["llmroute.dev/injection"],
        "injected",
        "{}",
        log_text()
    );
    let sidecar = &pod["spec"]["initContainers"][0];
    assert_eq!(sidecar["name"], "llmroute-sidecar");
    assert_eq!(sidecar["restartPolicy"], "Always", "a native sidecar");
    assert_eq!(sidecar["image"], "llmroute:0.1.0");
    let app_env = pod["spec"]["containers"][0]["env"].as_array().unwrap();
    assert!(
        app_env
            .iter()
            .any(|e| e["name"] == "OPENAI_BASE_URL" && e["value"] == "http://127.0.0.1:8099/v1"),
        "{app_env:?}"
    );
    let policies = kubectl_json(&["-n", &app_namespace, "get", "llmpolicies"]);
    let policy_names: Vec<String> = policies["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(policy_names, ["chat-v1"]);

    // On SIGTERM the operator reports itself not ready at once, so that Services stop sending
    // it requests, and keeps injecting until its drain time (5 s by default) has passed.
    Command::new("kill")
        .args(["-TERM", &operator.child.id().to_string()])
        .status()
        .unwrap();
    eventually("/readyz to answer 503 while draining", || {
        let (status, body) = http_get(ops, "/readyz")?;
        (status == 503 && body == "the operator is shutting down\n").then_some(())
    });
    let pod = dry_run_pod(&app_namespace, "draining").expect("a dry-run pod");
    assert_eq!(
        pod["metadata"]["labels"]["llmroute.dev/injection"],
        "injected",
        "the webhook injects while the operator drains: {}",
        log_text()
    );
    drop(operator);
    point_webhook_at(None, &release_namespace);

    // An upgrade with changed values keeps the claims (and so the stored events) and the
    // policy history.
    helm_ok(&[
        "upgrade",
        "llmroute",
        chart.as_str(),
        "--kubeconfig",
        config.as_str(),
        "--namespace",
        release_namespace.as_str(),
        "--reuse-values",
        // The operator's leader co-owns the webhook configuration's fields through server-side
        // apply, so a changed webhook value conflicts without this flag.
        "--force-conflicts",
        "--set",
        "webhook.timeoutSeconds=5",
        "--set",
        "events.maxAgeDays=90",
    ]);
    let set = kubectl_json(&[
        "-n",
        &release_namespace,
        "get",
        "statefulset",
        "llmroute-operator",
    ]);
    let args = set["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains("--event-max-age-days=90"), "{args}");
    assert!(args.contains("--webhook-timeout-seconds=5"), "{args}");
    assert_eq!(
        pvc_uids(&release_namespace),
        claims,
        "the upgrade kept the claims"
    );
    let configuration = kubectl_json(&[
        "get",
        "mutatingwebhookconfiguration",
        "llmroute-sidecar-injector",
    ]);
    assert_eq!(configuration["webhooks"][0]["timeoutSeconds"], 5);
    let after = kubectl_json(&["-n", &app_namespace, "get", "llmpolicies"]);
    assert_eq!(after["items"].as_array().unwrap().len(), policy_names.len());

    // Uninstall removes the release's objects but leaves the CRDs, the routes and the claims.
    helm_ok(&[
        "uninstall",
        "llmroute",
        "--kubeconfig",
        config.as_str(),
        "--namespace",
        release_namespace.as_str(),
    ]);
    assert!(
        !kubectl(
            &[
                "-n",
                &release_namespace,
                "get",
                "statefulset",
                "llmroute-operator"
            ],
            None
        )
        .status
        .success()
    );
    assert!(
        !kubectl(
            &[
                "get",
                "mutatingwebhookconfiguration",
                "llmroute-sidecar-injector"
            ],
            None
        )
        .status
        .success()
    );
    kubectl_ok(&["get", "crd", "llmroutes.llmroute.dev"], None);
    kubectl_ok(&["-n", &app_namespace, "get", "llmroutes", "chat"], None);
    assert_eq!(
        pvc_uids(&release_namespace),
        claims,
        "uninstall kept the claims"
    );

    // No operator runs to remove the route's finalizer, so the test removes it.
    kubectl_ok(
        &[
            "-n",
            &app_namespace,
            "patch",
            "llmroutes",
            "chat",
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":null}}"#,
        ],
        None,
    );
    for namespace in [&release_namespace, &app_namespace] {
        let _ = kubectl(&["delete", "namespace", namespace, "--wait=false"], None);
    }
}

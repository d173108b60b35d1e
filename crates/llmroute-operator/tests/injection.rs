//! The injection webhook against a real Kubernetes API server (which calls it over TLS), one
//! namespace and one webhook configuration per test.
//!
//! Like `cluster.rs`, these tests need the server of `scripts/k8s-testenv`; `scripts/test`
//! runs them with `--ignored`, and they fail when `LLMROUTE_TEST_KUBECONFIG` is not set.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use llmroute_api::crd::LlmRoute;
use llmroute_operator::leader::LeaderElection;
use llmroute_operator::webhook::certs::Lifetimes;
use llmroute_operator::webhook::inject::{InjectionSettings, SIDECAR_NAME};
use llmroute_operator::webhook::{WebhookConfigSpec, WebhookTarget};
use llmroute_operator::{
    CertificateSource, Listeners, OperatorConfig, SidecarMode, WebhookOptions,
};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

mod common;

use common::{ENCODER, client, get};

const WAIT: Duration = Duration::from_secs(40);

/// Polls `check` every 100 ms until it returns `Some`, for at most [`WAIT`].
async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    common::eventually_within(WAIT, what, check).await
}

/// A namespace with the CRDs, a ready route `chat`, and an operator whose webhook only this
/// namespace's pods reach.
struct Setup {
    client: Client,
    namespace: String,
    configuration: String,
    ops: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    sidecar_mode: SidecarMode,
    _data: tempfile::TempDir,
}

impl Setup {
    async fn new(test: &str, lifetimes: Lifetimes) -> Self {
        Self::with_certificate(test, managed(lifetimes), None, SidecarMode::Auto).await
    }

    /// `injector_ca`: the CA that the test writes into the webhook configuration, as
    /// cert-manager's CA injector would for a certificate it manages.
    async fn with_certificate(
        test: &str,
        certificate: CertificateSource,
        injector_ca: Option<String>,
        sidecar_mode: SidecarMode,
    ) -> Self {
        let client = client().await;
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in llmroute_api::crd::definitions() {
            crds.patch(
                &crd.name_any(),
                &PatchParams::apply("llmroute-tests").force(),
                &Patch::Apply(&crd),
            )
            .await
            .unwrap();
        }
        let namespace = format!("w-{test}-{}", std::process::id() % 100_000);
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let object: Namespace =
            serde_json::from_value(json!({"metadata": {"name": namespace}})).unwrap();
        namespaces
            .create(&PostParams::default(), &object)
            .await
            .unwrap();
        let routes: Api<LlmRoute> = Api::namespaced(client.clone(), &namespace);
        let route = json!({
            "apiVersion": "llmroute.dev/v1alpha1",
            "kind": "LLMRoute",
            "metadata": {"name": "chat"},
            "spec": {
                "models": [
                    {"name": "small", "endpoint": "http://127.0.0.1:9/v1", "model": "s",
                     "pricing": {"inputUsdPerMillionTokens": 0.1, "outputUsdPerMillionTokens": 0.4}},
                    {"name": "large", "endpoint": "http://127.0.0.1:9/v1", "model": "l",
                     "apiKeySecretRef": {"name": "keys", "key": "large"},
                     "pricing": {"inputUsdPerMillionTokens": 2.5, "outputUsdPerMillionTokens": 10}}
                ],
                "defaultPreference": {"quality": 0.7},
                "fallback": "small"
            }
        });
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
        let secret: Secret = serde_json::from_value(
            json!({"metadata": {"name": "keys"}, "stringData": {"large": "sk-test"}}),
        )
        .unwrap();
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
        routes
            .patch(
                "chat",
                &PatchParams::apply("llmroute-tests"),
                &Patch::Apply(&route),
            )
            .await
            .unwrap();
        let mut setup = Self {
            client,
            configuration: format!("llmroute-injector-{namespace}"),
            namespace,
            ops: String::new(),
            stop: None,
            task: None,
            sidecar_mode,
            _data: tempfile::tempdir().unwrap(),
        };
        setup.start(certificate, injector_ca).await;
        setup
    }

    async fn start(&mut self, certificate: CertificateSource, injector_ca: Option<String>) {
        let control = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let webhook = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let webhook_url = format!(
            "https://127.0.0.1:{}/inject",
            webhook.local_addr().unwrap().port()
        );
        self.ops = format!("http://{}", ops.local_addr().unwrap());
        let mut labels = BTreeMap::new();
        labels.insert(
            "kubernetes.io/metadata.name".to_string(),
            self.namespace.clone(),
        );
        let config = OperatorConfig {
            control_address: control.local_addr().unwrap(),
            ops_address: ops.local_addr().unwrap(),
            data_dir: self._data.path().to_path_buf(),
            election: LeaderElection {
                renew_every: Duration::from_millis(500),
                lease_duration: Duration::from_secs(4),
                ..LeaderElection::new(&self.namespace, "llmroute-operator", "webhook-test")
            },
            encoder_digest: ENCODER.into(),
            embedding_dim: 384,
            watch_namespace: Some(self.namespace.clone()),
            webhook: Some(WebhookOptions {
                address: webhook.local_addr().unwrap(),
                injection: InjectionSettings {
                    image: "llmroute:test".into(),
                    control_url: "http://127.0.0.1:8090".into(),
                    ..InjectionSettings::default()
                },
                sidecar_mode: self.sidecar_mode,
                configuration: WebhookConfigSpec {
                    name: self.configuration.clone(),
                    namespace_labels: Some(labels),
                    target: WebhookTarget::Url(webhook_url),
                    failure_policy: "Ignore".into(),
                    timeout_seconds: 3,
                    excluded_namespaces: vec!["kube-system".into()],
                },
                certificate,
            }),
            learning_interval: None,
            shutdown_drain: std::time::Duration::ZERO,
            replication_interval: llmroute_operator::replication::DEFAULT_PULL_INTERVAL,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let client = self.client.clone();
        self.task = Some(tokio::spawn(async move {
            let listeners = Listeners {
                control,
                ops,
                webhook: Some(webhook),
            };
            llmroute_operator::run_with_listeners(client, config, listeners, async {
                let _ = stopped.await;
            })
            .await
            .expect("the operator runs");
        }));
        self.stop = Some(stop);
        // Ready when the route is served and the configuration carries the CA.
        let configurations: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
        let name = self.configuration.clone();
        if let Some(ca) = injector_ca {
            eventually("the webhook configuration", || async {
                configurations.get_opt(&name).await.ok()?
            })
            .await;
            let patch = json!({"webhooks": [{
                "name": "inject.llmroute.dev",
                "clientConfig": {"caBundle": k8s_openapi::ByteString(ca.into_bytes())},
            }]});
            configurations
                .patch(&name, &PatchParams::default(), &Patch::Strategic(&patch))
                .await
                .unwrap();
        }
        eventually("the webhook configuration with a CA bundle", || async {
            let configuration = configurations.get_opt(&name).await.ok()??;
            let webhook = configuration.webhooks?.into_iter().next()?;
            webhook.client_config.ca_bundle.map(|_| ())
        })
        .await;
        let routes: Api<LlmRoute> = Api::namespaced(self.client.clone(), &self.namespace);
        eventually("route chat ready", || async {
            let route = routes.get("chat").await.ok()?;
            route
                .status?
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.reason == "Serving")
                .then_some(())
        })
        .await;
    }

    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("the operator stops within 20 s")
                .expect("the operator task ends cleanly");
        }
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    async fn create_pod(
        &self,
        name: &str,
        annotations: serde_json::Value,
        host_network: bool,
    ) -> Pod {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": annotations},
            "spec": {
                "hostNetwork": host_network,
                "containers": [{"name": "app", "image": "app:1"}]
            }
        }))
        .unwrap();
        self.pods()
            .create(&PostParams::default(), &pod)
            .await
            .unwrap()
    }

    async fn events_for(&self, pod: &str) -> Vec<Event> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &self.namespace);
        api.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pod))
            .collect()
    }

    async fn finish(mut self) {
        self.stop().await;
        let configurations: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
        let _ = configurations
            .delete(&self.configuration, &DeleteParams::default())
            .await;
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let _ = namespaces
            .delete(&self.namespace, &DeleteParams::default())
            .await;
    }
}

fn managed(lifetimes: Lifetimes) -> CertificateSource {
    CertificateSource::Managed {
        secret: "llmroute-webhook-tls".into(),
        hosts: vec!["127.0.0.1".into()],
        lifetimes,
    }
}

fn sidecars(pod: &Pod) -> Vec<Container> {
    let spec = pod.spec.clone().unwrap();
    spec.containers
        .into_iter()
        .chain(spec.init_containers.unwrap_or_default())
        .filter(|c| c.name == SIDECAR_NAME)
        .collect()
}

#[tokio::test]
#[ignore = "needs the API server of scripts/k8s-testenv; scripts/test runs it"]
async fn deployment_pods_are_injected_once_and_skips_are_visible() {
    let setup = Setup::new("inject", Lifetimes::default()).await;

    // A Deployment with the annotation: every pod injected, once.
    let deployments: Api<Deployment> = Api::namespaced(setup.client.clone(), &setup.namespace);
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "app"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "app"}},
            "template": {
                "metadata": {"labels": {"app": "app"}, "annotations": {"llmroute.dev/route": "chat"}},
                "spec": {"containers": [{"name": "app", "image": "app:1"}]}
            }
        }
    }))
    .unwrap();
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let pods = eventually("three pods of the Deployment", || async {
        let pods = setup
            .pods()
            .list(&ListParams::default().labels("app=app"))
            .await
            .ok()?
            .items;
        (pods.len() == 3).then_some(pods)
    })
    .await;
    for pod in &pods {
        let injected = sidecars(pod);
        assert_eq!(injected.len(), 1, "{}", pod.name_any());
        // The server is 1.37: the sidecar is a native one.
        assert_eq!(injected[0].restart_policy.as_deref(), Some("Always"));
        let env = pod.spec.as_ref().unwrap().containers[0]
            .env
            .clone()
            .unwrap();
        assert!(env.iter().any(|e| e.name == "OPENAI_BASE_URL"), "{env:?}");
        assert_eq!(pod.labels()["llmroute.dev/injection"], "injected");
    }

    // A pod submitted with the injection already in it is not changed.
    let mut again = pods[0].clone();
    again.metadata = serde_json::from_value(json!({
        "name": "resubmitted",
        "annotations": pods[0].annotations(),
        "labels": {"resubmitted": "yes"},
    }))
    .unwrap();
    let spec = again.spec.as_mut().unwrap();
    spec.node_name = None;
    let created = setup
        .pods()
        .create(&PostParams::default(), &again)
        .await
        .unwrap();
    assert_eq!(sidecars(&created).len(), 1, "not injected twice");
    assert_eq!(
        created.spec.as_ref().unwrap().containers[0]
            .env
            .as_ref()
            .unwrap()
            .iter()
            .filter(|e| e.name == "OPENAI_BASE_URL")
            .count(),
        1
    );

    // Skips: host network, and a route that does not exist; each with an Event, as the
    // resubmitted pod has.
    let host = setup
        .create_pod("host", json!({"llmroute.dev/route": "chat"}), true)
        .await;
    assert!(sidecars(&host).is_empty());
    assert_eq!(host.labels()["llmroute.dev/injection"], "skipped");
    let missing = setup
        .create_pod("missing", json!({"llmroute.dev/route": "nope"}), false)
        .await;
    assert!(sidecars(&missing).is_empty());
    for (pod, reason, kind) in [
        ("host", "InjectionSkippedHostNetwork", "Warning"),
        ("missing", "InjectionSkippedRouteNotFound", "Warning"),
        ("resubmitted", "InjectionSkippedAlreadyInjected", "Normal"),
    ] {
        let event = eventually(&format!("the {reason} Event"), || async {
            setup
                .events_for(pod)
                .await
                .into_iter()
                .find(|e| e.reason.as_deref() == Some(reason))
        })
        .await;
        assert_eq!(event.type_.as_deref(), Some(kind), "{reason}");
    }
    // An unannotated pod is left alone.
    let plain = setup.create_pod("plain", json!({}), false).await;
    assert!(sidecars(&plain).is_empty());
    assert!(!plain.labels().contains_key("llmroute.dev/injection"));

    // The route counts its pods: 3 from the Deployment and the resubmitted one; one skip
    // (the missing route's pod names another route).
    let routes: Api<LlmRoute> = Api::namespaced(setup.client.clone(), &setup.namespace);
    eventually("pod counts in the route status", || async {
        let status = routes.get("chat").await.ok()?.status?;
        (status.injected_pods == Some(4) && status.skipped_pods == Some(1)).then_some(())
    })
    .await;
    let (_, metrics) = get(&format!("{}/metrics", setup.ops)).await.unwrap();
    let metrics = String::from_utf8(metrics).unwrap();
    for line in [
        "llmroute_operator_webhook_reviews_total{outcome=\"injected\"} 3",
        "llmroute_operator_webhook_reviews_total{outcome=\"already_injected\"} 1",
        "llmroute_operator_injection_skips_total{reason=\"HostNetwork\"} 1",
        "llmroute_operator_injection_skips_total{reason=\"RouteNotFound\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    // The match condition kept the unannotated pod away from the webhook.
    assert!(
        !metrics.contains("outcome=\"not_requested\""),
        "the webhook reviewed a pod that names no route:\n{metrics}"
    );
    // The API server reached the webhook over TLS: at least one handshake completed, and the
    // handshake histogram counted each established connection.
    let sample = |name: &str| {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let established = sample("llmroute_operator_webhook_connections_total{result=\"established\"}");
    assert!(
        established >= 1.0,
        "no TLS connection counted in\n{metrics}"
    );
    assert_eq!(
        sample("llmroute_operator_webhook_tls_handshake_seconds_count"),
        established,
        "one handshake time per established connection"
    );
    setup.finish().await;
}

/// With regular-container sidecars, the pod that the Job controller creates gets a sidecar
/// with POST /shutdown, which its app calls so that the pod can complete.
#[tokio::test]
#[ignore = "needs the API server of scripts/k8s-testenv; scripts/test runs it"]
async fn job_pod_gets_stoppable_sidecar() {
    let setup = Setup::with_certificate(
        "job",
        managed(Lifetimes::default()),
        None,
        SidecarMode::Classic,
    )
    .await;
    let jobs: Api<Job> = Api::namespaced(setup.client.clone(), &setup.namespace);
    let job: Job = serde_json::from_value(json!({
        "metadata": {"name": "nightly-eval"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"annotations": {"llmroute.dev/route": "chat"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "eval", "image": "app:1"}]
                }
            }
        }
    }))
    .unwrap();
    jobs.create(&PostParams::default(), &job).await.unwrap();
    let pod = eventually("the Job's pod", || async {
        let pods = setup
            .pods()
            .list(&ListParams::default().labels("batch.kubernetes.io/job-name=nightly-eval"))
            .await
            .ok()?
            .items;
        pods.into_iter().next()
    })
    .await;
    let injected = sidecars(&pod);
    assert_eq!(injected.len(), 1, "{pod:?}");
    assert!(
        injected[0].restart_policy.is_none(),
        "a regular container: {:?}",
        injected[0].restart_policy
    );
    let args = injected[0].args.clone().unwrap();
    assert!(
        args.contains(&"--shutdown-endpoint".to_string()),
        "{args:?}"
    );
    assert!(
        args.windows(2).any(|pair| pair == ["--drain-seconds", "5"]),
        "{args:?}"
    );

    // A pod that no Job controls gets no endpoint.
    let single = setup
        .create_pod("single", json!({"llmroute.dev/route": "chat"}), false)
        .await;
    let args = sidecars(&single)[0].args.clone().unwrap();
    assert!(
        !args.contains(&"--shutdown-endpoint".to_string()),
        "{args:?}"
    );
    setup.finish().await;
}

#[tokio::test]
#[ignore = "needs the API server of scripts/k8s-testenv; scripts/test runs it"]
async fn webhook_down_with_ignore_still_creates_pods() {
    let mut setup = Setup::new("down", Lifetimes::default()).await;
    setup.stop().await;
    // The configuration still points at the stopped webhook.
    let pod = setup
        .create_pod("orphan", json!({"llmroute.dev/route": "chat"}), false)
        .await;
    assert!(sidecars(&pod).is_empty(), "created without the sidecar");
    setup.finish().await;
}

#[tokio::test]
#[ignore = "needs the API server of scripts/k8s-testenv; scripts/test runs it"]
async fn restricted_namespace_admits_injected_pod() {
    // The API server's PodSecurity admission runs after mutating webhooks, so the injected
    // sidecar must meet the namespace's level too. This pod meets "restricted" container by
    // container, without a pod-level seccomp profile.
    let setup = Setup::new("psa", Lifetimes::default()).await;

    let namespaces: Api<Namespace> = Api::all(setup.client.clone());
    let label =
        json!({"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}});
    namespaces
        .patch(
            &setup.namespace,
            &PatchParams::default(),
            &Patch::Merge(&label),
        )
        .await
        .unwrap();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "restricted", "annotations": {"llmroute.dev/route": "chat"}},
        "spec": {"containers": [{
            "name": "app",
            "image": "app:1",
            "securityContext": {
                "runAsNonRoot": true,
                "allowPrivilegeEscalation": false,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            },
        }]}
    }))
    .unwrap();

    let created = setup
        .pods()
        .create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|error| {
            panic!("the restricted namespace refused the injected pod: {error}")
        });
    assert_eq!(sidecars(&created).len(), 1, "{created:?}");
    setup.finish().await;
}

#[tokio::test]
#[ignore = "needs the API server of scripts/k8s-testenv; scripts/test runs it"]
async fn rotated_certificate_keeps_the_webhook_called() {
    let lifetimes = Lifetimes {
        ca: Duration::from_secs(3600),
        serving: Duration::from_secs(20),
        renew_before: Duration::from_secs(14),
    };
    let setup = Setup::new("rotate", lifetimes).await;
    let secrets: Api<Secret> = Api::namespaced(setup.client.clone(), &setup.namespace);
    let read = || async {
        let secret = secrets.get("llmroute-webhook-tls").await.unwrap();
        let data = secret.data.unwrap();
        (data["tls.crt"].0.clone(), data["ca.crt"].0.clone())
    };
    let (first_cert, first_ca) = read().await;
    let before = setup
        .create_pod("before", json!({"llmroute.dev/route": "chat"}), false)
        .await;
    assert_eq!(sidecars(&before).len(), 1);
    let (second_cert, second_ca) = eventually("a rotated serving certificate", || async {
        let (cert, ca) = read().await;
        (cert != first_cert).then_some((cert, ca))
    })
    .await;
    assert_ne!(second_cert, first_cert);
    assert_eq!(
        second_ca, first_ca,
        "the CA stays; only the serving certificate rotates"
    );
    // Give the server's TLS listener the new certificate (checked every 5 s), then admit.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after = setup
        .create_pod("after", json!({"llmroute.dev/route": "chat"}), false)
        .await;
    assert_eq!(sidecars(&after).len(), 1, "injected after the rotation");
    setup.finish().await;
}

#[tokio::test]
#[ignore = "needs the API server of scripts/k8s-testenv; scripts/test runs it"]
async fn certificate_files_from_another_tool_are_served_and_reloaded() {
    use llmroute_operator::webhook::certs::{generate, renew_serving};
    let folder = tempfile::tempdir().unwrap();
    let hosts = vec!["127.0.0.1".to_string()];
    let mut set = generate(&hosts, &Lifetimes::default()).unwrap();
    let write = |set: &llmroute_operator::webhook::certs::CertificateSet| {
        std::fs::write(folder.path().join("tls.crt"), &set.cert_pem).unwrap();
        std::fs::write(folder.path().join("tls.key"), &set.key_pem).unwrap();
    };
    write(&set);
    let source = CertificateSource::Files {
        folder: folder.path().to_path_buf(),
    };
    let setup =
        Setup::with_certificate("files", source, Some(set.ca_pem.clone()), SidecarMode::Auto).await;
    let first = setup
        .create_pod("first", json!({"llmroute.dev/route": "chat"}), false)
        .await;
    assert_eq!(sidecars(&first).len(), 1);
    // The other tool renews the certificate; the operator serves the new files.
    renew_serving(&mut set, &hosts, &Lifetimes::default()).unwrap();
    write(&set);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let second = setup
        .create_pod("second", json!({"llmroute.dev/route": "chat"}), false)
        .await;
    assert_eq!(
        sidecars(&second).len(),
        1,
        "injected with the renewed certificate"
    );
    // The operator never wrote a Secret of its own.
    let secrets: Api<Secret> = Api::namespaced(setup.client.clone(), &setup.namespace);
    assert!(
        secrets
            .get_opt("llmroute-webhook-tls")
            .await
            .unwrap()
            .is_none()
    );
    setup.finish().await;
}

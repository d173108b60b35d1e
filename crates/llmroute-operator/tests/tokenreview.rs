//! The TokenReview authenticator against a real API server: tokens minted with the
//! TokenRequest API for the `llmroute.dev` audience are accepted with their namespace, tokens
//! for another audience and forged tokens are rejected. Needs LLMROUTE_TEST_KUBECONFIG (see
//! docs/testing.md); `scripts/test` runs it.

// This test uses only the client helper.
#[allow(dead_code)]
mod common;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use llmroute_control::auth::{AuthError, Authenticator, CacheSettings, CachedAuthenticator};
use llmroute_operator::tokenreview::TokenReviewAuthenticator;
use serde_json::json;

const AUDIENCE: &str = "llmroute.dev";

async fn mint_token(accounts: &Api<ServiceAccount>, account: &str, audience: &str) -> String {
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![audience.to_string()]),
            expiration_seconds: Some(600),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let minted = accounts
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest for audience {audience} failed: {e}"));
    minted
        .status
        .and_then(|status| status.token)
        .expect("a TokenRequest status with a token")
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: LLMROUTE_TEST_KUBECONFIG"]
async fn tokenreview_checks_audience_and_namespace() {
    let client = common::client().await;
    let namespace = format!("t-tokenreview-{}", std::process::id() % 100_000);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": namespace}})).unwrap(),
        )
        .await
        .expect("the test namespace is created");
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
    accounts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "app"}})).unwrap(),
        )
        .await
        .expect("the service account is created");

    let good = mint_token(&accounts, "app", AUDIENCE).await;
    let other_audience = mint_token(&accounts, "app", "other.example").await;
    let reviewer = TokenReviewAuthenticator::new(client.clone(), AUDIENCE);

    let identity = reviewer
        .authenticate(&good)
        .await
        .expect("a token for llmroute.dev is accepted");
    assert_eq!(identity.namespace.as_deref(), Some(namespace.as_str()));
    assert_eq!(identity.name, format!("{namespace}/app"));
    assert!(identity.may_access_route(&format!("{namespace}/chat")));
    assert!(!identity.may_access_route("default/chat"));

    let rejected = reviewer.authenticate(&other_audience).await;
    assert!(
        matches!(
            rejected,
            Err(AuthError::Invalid(_) | AuthError::WrongAudience { .. })
        ),
        "a token for another audience: {rejected:?}"
    );

    // A signed token with one character of the signature changed.
    let mut forged = good.clone().into_bytes();
    let last = forged.len() - 2;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let rejected = reviewer.authenticate(&forged).await;
    assert!(
        matches!(rejected, Err(AuthError::Invalid(_))),
        "a forged token: {rejected:?}"
    );
    let rejected = reviewer.authenticate("not-a-token").await;
    assert!(
        matches!(rejected, Err(AuthError::Invalid(_))),
        "a random string: {rejected:?}"
    );

    // The cached authenticator returns the same results.
    let cached = CachedAuthenticator::new(reviewer, CacheSettings::default());
    assert_eq!(cached.authenticate(&good).await, Ok(identity.clone()));
    assert_eq!(cached.authenticate(&good).await, Ok(identity));
    assert!(cached.authenticate(&other_audience).await.is_err());
    assert_eq!(cached.len(), 2);

    namespaces
        .delete(&namespace, &DeleteParams::default())
        .await
        .expect("the test namespace is deleted");
}

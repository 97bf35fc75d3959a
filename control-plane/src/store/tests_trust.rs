//! Join tokens and revocations, on the engine under test.

use procurator_core::{Identity, Role};
use procurator_proto::v1::{certificate_event::Action, event};

use super::tests::{m, open};
use super::{Redeemed, Revoked, Store, TokenRefusal};

const HOUR_MS: i64 = 3_600_000;

/// Redeem `token` for `machine`, "signing" with a fixed serial.
async fn redeem(store: &Store, machine: &str, token: &str) -> Result<Identity, TokenRefusal> {
    let redeemed = store
        .redeem_join_token(m(machine), token.into(), "192.0.2.1:4000".into(), |id| {
            Ok::<_, String>((id.clone(), "0a0b".into()))
        })
        .await
        .unwrap();
    match redeemed {
        Redeemed::Issued(identity) => Ok(identity),
        Redeemed::Refused(refusal) => Err(refusal),
        Redeemed::NotSigned(e) => panic!("{e}"),
    }
}

fn certificate_actions(events: &[procurator_proto::v1::Event]) -> Vec<(Action, String)> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(event::Kind::Certificate(c)) => Some((c.action(), c.identity.clone())),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_join_token_enrolls_its_machine_once_and_no_other() {
    let (_db, store) = open();
    let token = store
        .create_join_token(m("worker-7"), true, HOUR_MS, "operator/alice".into())
        .await
        .unwrap()
        .unwrap();
    assert!(
        token.token.starts_with("pjt_") && token.token.len() > 40,
        "{}",
        token.token
    );

    // Only the hash is stored.
    assert!(matches!(
        redeem(&store, "worker-7", &format!("{}x", token.token)).await,
        Err(TokenRefusal::Unknown)
    ));
    match redeem(&store, "worker-8", &token.token).await {
        Err(TokenRefusal::OtherMachine { token_for, claimed }) => {
            assert_eq!(
                (token_for.as_str(), claimed.as_str()),
                ("worker-7", "worker-8")
            );
        }
        other => panic!("{other:?}"),
    }
    // A refused attempt used nothing up.
    let identity = redeem(&store, "worker-7", &token.token).await.unwrap();
    assert_eq!(identity.to_string(), "agent/worker-7");
    assert!(identity.vm_host, "the token said it may host VMs");
    assert!(matches!(
        redeem(&store, "worker-7", &token.token).await,
        Err(TokenRefusal::Used(_))
    ));

    // A signing that fails leaves a token unused.
    let second = store
        .create_join_token(m("worker-9"), false, HOUR_MS, "operator/alice".into())
        .await
        .unwrap()
        .unwrap();
    let failed = store
        .redeem_join_token(m("worker-9"), second.token.clone(), String::new(), |_| {
            Err::<((), String), _>("no")
        })
        .await
        .unwrap();
    assert!(matches!(failed, Redeemed::NotSigned("no")));
    assert!(
        !redeem(&store, "worker-9", &second.token)
            .await
            .unwrap()
            .vm_host
    );

    let events = store.events_after(0, None, usize::MAX).await.unwrap();
    assert_eq!(
        certificate_actions(&events),
        [
            (Action::JoinTokenCreated, "agent/worker-7".into()),
            // The unknown token left no trace; the other name did.
            (Action::EnrollRefused, "agent/worker-8".into()),
            // Its reuse, refused within a minute of the last refusal, did not.
            (Action::Enrolled, "agent/worker-7".into()),
            (Action::JoinTokenCreated, "agent/worker-9".into()),
            (Action::Enrolled, "agent/worker-9".into()),
        ]
    );
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let (_db, store) = open();
    let token = store
        .create_join_token(m("worker-1"), false, -1, "operator/alice".into())
        .await
        .unwrap()
        .unwrap();
    let refusal = redeem(&store, "worker-1", &token.token).await.unwrap_err();
    assert!(matches!(refusal, TokenRefusal::Expired(_)), "{refusal}");
    assert!(refusal.to_string().contains("expired at"), "{refusal}");
}

#[tokio::test]
async fn revocations_are_kept_in_order_with_who_and_why() {
    let (_db, store) = open();
    let by_name = store
        .revoke(
            Revoked::Identity(Role::Operator, m("bob")),
            "left the team".into(),
            "operator/alice".into(),
        )
        .await
        .unwrap();
    let by_serial = store
        .revoke(
            Revoked::Serial("0a0b".into()),
            String::new(),
            "operator/alice".into(),
        )
        .await
        .unwrap();
    assert!(by_serial.id > by_name.id);
    let list = store.list_revocations().await.unwrap();
    assert_eq!(list, [by_name.clone(), by_serial]);
    assert_eq!(
        (
            by_name.role.as_str(),
            by_name.name.as_str(),
            by_name.revoked_by.as_str()
        ),
        ("operator", "bob", "operator/alice")
    );
    let events = store.events_after(0, None, usize::MAX).await.unwrap();
    assert_eq!(
        certificate_actions(&events),
        [
            (Action::Revoked, "operator/bob".into()),
            (Action::Revoked, String::new()),
        ]
    );
}

//! `procurator-ctl dashboard`: serve the web dashboard (`ctl/src/dashboard/`)
//! on this machine until interrupted.

use std::net::SocketAddr;

use crate::Outcome;
use crate::connection::ConnectionArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to listen. The default, a free port on loopback, is reachable
    /// from this machine only; anything else should sit behind a proxy
    /// that authenticates (docs/interfaces.md).
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR:PORT")]
    pub listen: SocketAddr,
}

pub async fn run(conn: &ConnectionArgs, args: Args) -> anyhow::Result<Outcome> {
    let conn = conn.connect().await?;
    if !args.listen.ip().is_loopback() {
        eprintln!(
            "warning: the dashboard listens on {}, beyond this machine; its token is all that guards it, over plain HTTP",
            args.listen
        );
    }
    let (listener, router, url) = crate::dashboard::bind(conn, args.listen).await?;
    // The URL alone on stdout, for a script to read; what it is on stderr.
    println!("{url}");
    eprintln!("the dashboard is at the URL above (it carries its token); Ctrl-C stops it");
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(Outcome::Success)
}

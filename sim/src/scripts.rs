//! The `bin/` scripts shipped in a simulated release, embedded in the binary. They are the
//! simulator's own, written to behave like the product's 7.x-9.x scripts.

/// `(file name in bin/, content)` of every script a release carries.
pub const BIN_SCRIPTS: &[(&str, &str)] = &[
    (
        "start-bitbucket.sh",
        include_str!("../scripts/start-bitbucket.sh"),
    ),
    (
        "stop-bitbucket.sh",
        include_str!("../scripts/stop-bitbucket.sh"),
    ),
    (
        "set-bitbucket-home.sh",
        include_str!("../scripts/set-bitbucket-home.sh"),
    ),
    (
        "set-bitbucket-user.sh",
        include_str!("../scripts/set-bitbucket-user.sh"),
    ),
    (
        "set-jre-home.sh",
        include_str!("../scripts/set-jre-home.sh"),
    ),
    (
        "set-jmx-opts.sh",
        include_str!("../scripts/set-jmx-opts.sh"),
    ),
    (
        "_start-webapp.sh",
        include_str!("../scripts/_start-webapp.sh"),
    ),
    (
        "_stop-webapp.sh",
        include_str!("../scripts/_stop-webapp.sh"),
    ),
    (
        "_start-search.sh",
        include_str!("../scripts/_start-search.sh"),
    ),
    (
        "_stop-search.sh",
        include_str!("../scripts/_stop-search.sh"),
    ),
];

/// Sets the home in a shipped `set-bitbucket-home.sh`: the 4-space `BITBUCKET_HOME=` line inside
/// `if [ -z "$BITBUCKET_HOME" ]; then`, as an administrator edits it.
pub fn with_bitbucket_home(script: &str, home: &str) -> Option<String> {
    let mut done = false;
    let lines: Vec<String> = script
        .lines()
        .map(|line| {
            if !done && line.starts_with("    BITBUCKET_HOME=") {
                done = true;
                format!("    BITBUCKET_HOME=\"{home}\"")
            } else {
                line.to_string()
            }
        })
        .collect();
    done.then(|| lines.join("\n") + "\n")
}

/// Sets `JVM_SUPPORT_RECOMMENDED_ARGS` in `_start-webapp.sh`, replacing the shipped commented-out line
/// (or an earlier setting).
pub fn with_jvm_args(script: &str, args: &str) -> Option<String> {
    let mut done = false;
    let lines: Vec<String> = script
        .lines()
        .map(|line| {
            let t = line.trim_start_matches('#');
            if !done && t.starts_with("JVM_SUPPORT_RECOMMENDED_ARGS=") {
                done = true;
                format!("JVM_SUPPORT_RECOMMENDED_ARGS=\"{args}\"")
            } else {
                line.to_string()
            }
        })
        .collect();
    done.then(|| lines.join("\n") + "\n")
}

/// Sets the dedicated user in `set-bitbucket-user.sh`, as the installer does.
pub fn with_bitbucket_user(script: &str, user: &str) -> Option<String> {
    let mut done = false;
    let lines: Vec<String> = script
        .lines()
        .map(|line| {
            if !done && line.starts_with("BITBUCKET_USER=") {
                done = true;
                format!("BITBUCKET_USER=\"{user}\" ##")
            } else {
                line.to_string()
            }
        })
        .collect();
    done.then(|| lines.join("\n") + "\n")
}

fn script(name: &str) -> &'static str {
    BIN_SCRIPTS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .unwrap_or_default()
}

/// The shipped `set-bitbucket-home.sh`.
pub fn set_bitbucket_home_script() -> &'static str {
    script("set-bitbucket-home.sh")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_line_is_the_shipped_form() {
        let shipped = set_bitbucket_home_script();
        assert!(shipped.contains("if [ -z \"$BITBUCKET_HOME\" ]; then\n    BITBUCKET_HOME=\nfi\n"));
        let edited = with_bitbucket_home(shipped, "/var/bb").expect("edited");
        assert!(edited.contains("    BITBUCKET_HOME=\"/var/bb\"\n"));
        assert!(edited.contains("export BITBUCKET_HOME"));
    }

    #[test]
    fn jvm_args_and_user() {
        let edited = with_jvm_args(script("_start-webapp.sh"), "-Dserver.port=1").expect("edited");
        assert!(edited.contains("\nJVM_SUPPORT_RECOMMENDED_ARGS=\"-Dserver.port=1\"\n"));
        let again = with_jvm_args(&edited, "-Dserver.port=2").expect("edited");
        assert!(again.contains("-Dserver.port=2") && !again.contains("-Dserver.port=1"));
        let user = with_bitbucket_user(script("set-bitbucket-user.sh"), "bb").expect("edited");
        assert!(user.contains("BITBUCKET_USER=\"bb\" ##"));
    }
}

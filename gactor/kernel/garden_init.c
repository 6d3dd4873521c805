/* garden-init: pid 1 of every gactor container.
 *
 * It only reaps orphans and ignores every signal it can. Written in C because pid 1
 * lives as long as the container: a forked Python process there would cost ~2 MiB per
 * container and, being the largest process in a small memory cgroup, would be the OOM
 * killer's first pick (and its death takes the whole pid namespace down).
 * Built by gactor.kernel.init_binary with `cc -static`. Not Debian's tini (it needs a child
 * program and exits with it) nor catatonit -P (it exits on SIGTERM/SIGINT, so `kill 1` from
 * inside would end the container): measurements in docs/architecture.md.
 */
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>

int main(void) {
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, 0);
    /* exec'd through /proc/self/fd/N, so the kernel named us "N". */
    prctl(PR_SET_NAME, "garden-init", 0, 0, 0);
    for (;;) {
        int sig;
        if (sigwait(&all, &sig) == 0 && sig == SIGCHLD)
            while (waitpid(-1, 0, WNOHANG) > 0) {
            }
    }
}

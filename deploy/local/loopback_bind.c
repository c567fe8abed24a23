/* Preloaded into the Debezium agent's JVM: a socket bound to the IPv4 wildcard address is
 * bound to 127.0.0.1 instead. The agent's HTTP server (/health, /metrics) has a port setting
 * but no host one, and the stack binds every service to loopback only. The JVM runs with
 * -Djava.net.preferIPv4Stack=true, so every socket it opens is IPv4. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <sys/socket.h>

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static int (*real_bind)(int, const struct sockaddr *, socklen_t);
    if (!real_bind) {
        real_bind = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
    }
    if (addr && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        struct sockaddr_in loopback = *(const struct sockaddr_in *)addr;
        if (loopback.sin_addr.s_addr == htonl(INADDR_ANY)) {
            loopback.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return real_bind(fd, (const struct sockaddr *)&loopback, sizeof loopback);
        }
    }
    return real_bind(fd, addr, len);
}

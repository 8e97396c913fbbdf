# qublk build.  `make` builds build/qublk; `make asan` builds build-asan/qublk
# with AddressSanitizer/UBSan; `make check` runs the test suite against both;
# `make bench` runs the benchmarks and `make soak` the crash-state simulator
# over 100,000 power cuts (neither is part of check).
# `make install` (PREFIX, DESTDIR) installs the binary, the man pages
# (rendered from man/*.scd by scdoc: `make man`), the bash completion, the
# systemd unit and the udev rules; `make uninstall` removes them; `make
# deb` builds the Debian package into $(DEBDIR)/ (debian/, README "Install").
CC ?= gcc
O ?= build
CFLAGS_BASE := -std=gnu11 -Wall -Wextra -Werror -Wshadow -Wno-unused-parameter \
	-D_GNU_SOURCE -Isrc -g -MMD -MP
ifeq ($(SAN),1)
CFLAGS_OPT := -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined -DQUBLK_ASAN=1
LDFLAGS_SAN := -fsanitize=address,undefined
else
CFLAGS_OPT := -O2
LDFLAGS_SAN :=
endif
CFLAGS += $(CFLAGS_BASE) $(CFLAGS_OPT)
LDFLAGS += $(LDFLAGS_SAN) -Wl,-z,defs
GNUTLS_CFLAGS := $(shell pkg-config --cflags gnutls)
GNUTLS_LIBS := $(shell pkg-config --libs gnutls)
CFLAGS += $(GNUTLS_CFLAGS)
LDLIBS += -luring -lz -lzstd -lpthread $(GNUTLS_LIBS)

LIB_SRC := $(wildcard src/common/*.c src/block/*.c src/qcow2/*.c src/nbd/*.c src/ublk/*.c)
CLI_SRC := $(wildcard src/cli/*.c)
UNIT_SRC := $(wildcard tests/unit/*.c)
LIB_OBJ := $(LIB_SRC:%.c=$(O)/%.o)
CLI_OBJ := $(CLI_SRC:%.c=$(O)/%.o)
UNIT_BIN := $(UNIT_SRC:tests/unit/%.c=$(O)/tests/%)

all: $(O)/qublk $(UNIT_BIN)

$(O)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c -o $@ $<

$(O)/%.o: %.S
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c -o $@ $<

$(O)/libqublk.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(O)/qublk: $(CLI_OBJ) $(O)/libqublk.a
	$(CC) $(LDFLAGS) -o $@ $(CLI_OBJ) $(O)/libqublk.a $(LDLIBS)

$(O)/tests/%: $(O)/tests/unit/%.o $(O)/libqublk.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $< $(O)/libqublk.a $(LDLIBS)

asan:
	$(MAKE) O=build-asan SAN=1 all

check: all asan
	tests/run.sh

bench: all
	bench/run.sh

SOAK_STATES ?= 100000
soak: $(O)/tests/test_powercut
	$(O)/tests/test_powercut $(SOAK_STATES)

clean:
	rm -rf build build-asan

# ---- installation: binary, man pages, completion, systemd unit, udev rules
PREFIX ?= /usr/local
SBINDIR ?= $(PREFIX)/sbin
MANDIR ?= $(PREFIX)/share/man
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
SYSTEMDUNITDIR ?= $(PREFIX)/lib/systemd/system
UDEVRULESDIR ?= $(PREFIX)/lib/udev/rules.d
SYSCONFDIR ?= /etc
SCDOC ?= scdoc
INSTALL ?= install
# The binary to install (the tests install the one they test).
INSTALL_BIN ?= $(O)/qublk

MAN_SRC := $(wildcard man/*.scd)
MAN_OUT := $(MAN_SRC:man/%.scd=$(O)/man/%)

man: $(MAN_OUT)

$(O)/man/%: man/%.scd
	@mkdir -p $(dir $@)
	$(SCDOC) <$< >$@.tmp && mv $@.tmp $@

# The unit and the rules name the installed binary: @SBINDIR@.
install: $(INSTALL_BIN) man
	$(INSTALL) -d $(DESTDIR)$(SBINDIR) $(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(MANDIR)/man8 \
		$(DESTDIR)$(BASHCOMPDIR) $(DESTDIR)$(SYSTEMDUNITDIR) $(DESTDIR)$(UDEVRULESDIR) \
		$(DESTDIR)$(SYSCONFDIR)/qublk
	$(INSTALL) -m 755 $(INSTALL_BIN) $(DESTDIR)$(SBINDIR)/qublk
	$(INSTALL) -m 644 $(filter %.8,$(MAN_OUT)) $(DESTDIR)$(MANDIR)/man8/
	$(INSTALL) -m 644 $(filter %.5,$(MAN_OUT)) $(DESTDIR)$(MANDIR)/man5/
	$(INSTALL) -m 644 completion/qublk $(DESTDIR)$(BASHCOMPDIR)/qublk
	sed 's|@SBINDIR@|$(SBINDIR)|g' systemd/qublk@.service.in >$(DESTDIR)$(SYSTEMDUNITDIR)/qublk@.service
	chmod 644 $(DESTDIR)$(SYSTEMDUNITDIR)/qublk@.service
	sed 's|@SBINDIR@|$(SBINDIR)|g' udev/60-qublk.rules.in >$(DESTDIR)$(UDEVRULESDIR)/60-qublk.rules
	chmod 644 $(DESTDIR)$(UDEVRULESDIR)/60-qublk.rules

uninstall:
	rm -f $(DESTDIR)$(SBINDIR)/qublk $(DESTDIR)$(BASHCOMPDIR)/qublk \
		$(DESTDIR)$(SYSTEMDUNITDIR)/qublk@.service $(DESTDIR)$(UDEVRULESDIR)/60-qublk.rules \
		$(addprefix $(DESTDIR)$(MANDIR)/man8/,$(notdir $(filter %.8,$(MAN_OUT)))) \
		$(addprefix $(DESTDIR)$(MANDIR)/man5/,$(notdir $(filter %.5,$(MAN_OUT))))
	[ ! -d $(DESTDIR)$(SYSCONFDIR)/qublk ] || rmdir --ignore-fail-on-non-empty $(DESTDIR)$(SYSCONFDIR)/qublk

# The Debian package (debian/), built from a copy of the source tree in
# $(DEBDIR)/qublk (dpkg-buildpackage writes next to the tree it builds),
# then lintian (fails on an error) and debian/check-deb.sh on the .deb.
# Not under $(O): the build there includes every *.d it finds.
DEBDIR ?= build-deb
deb:
	rm -rf $(DEBDIR)
	mkdir -p $(DEBDIR)/qublk
	if git rev-parse --git-dir >/dev/null 2>&1; then \
		git ls-files -co --exclude-standard -z | tar -c --null -T - | tar -x -C $(DEBDIR)/qublk; \
	else \
		tar -c --exclude=./build --exclude=./build-asan --exclude=./$(DEBDIR) \
			--exclude=./tests/vm/.cache . | tar -x -C $(DEBDIR)/qublk; \
	fi
	cd $(DEBDIR)/qublk && dpkg-buildpackage -us -uc -b
	lintian --fail-on error --display-info $(DEBDIR)/qublk_*.changes
	debian/check-deb.sh $(DEBDIR)/qublk_*_$$(dpkg --print-architecture).deb

.PHONY: all asan check bench soak clean man install uninstall deb
-include $(shell find $(O) -name '*.d' -type f 2>/dev/null)
